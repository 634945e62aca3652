//! Real training data as instances with treatment steps: the data orders Pythia and OLMo published,
//! read from memory-mapped files without reading them whole.
//!
//! - [`IndexedDataset`]: the Megatron / GPT-NeoX memory-mapped indexed dataset (`PREFIX.idx` with the
//!   `MMIDIDX` header, `PREFIX.bin`), the layout of Pythia's pre-shuffled Pile, where row `r` is the
//!   `r`-th sequence the model saw.
//! - [`OlmoOrder`]: OLMo's data order, a `uint32` memmap of instance indices (`global_indices.npy`
//!   without its header, or the raw file), over token memmaps cut into `L`-token instances.
//! - [`sample`]: `K` positions per optimizer step of a step range and `N` validation positions from
//!   steps after it, seeded, as [`crate::instances`] lines.
//!
//! Steps are 1-based optimizer steps, as checkpoint `step{s}` is the model after `s` steps: the batch
//! of step `s` is data positions `[(s − 1)·B, s·B)`. Position `p` is the released statistics' `seq_idx`
//! `p + 1` (`memsteer profile --treatment-from-seq-idx`).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use memsteer_panel::rng::{SplitMix64, hash_key};

use crate::error::{At, bail, ensure};
use crate::weights::map;
use crate::{LmError, Result};

/// The element type of a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// `uint8` (Megatron code 1).
    U8,
    /// `int8` (code 2).
    I8,
    /// `int16` (code 3).
    I16,
    /// `int32` (code 4).
    I32,
    /// `int64` (code 5).
    I64,
    /// `uint16` (code 8; Pythia's).
    U16,
    /// `uint32` (OLMo's larger vocabularies).
    U32,
}

impl TokenType {
    /// Bytes per token.
    pub fn size(self) -> usize {
        match self {
            TokenType::U8 | TokenType::I8 => 1,
            TokenType::I16 | TokenType::U16 => 2,
            TokenType::I32 | TokenType::U32 => 4,
            TokenType::I64 => 8,
        }
    }

    /// The type of a Megatron dtype code.
    fn megatron(code: u8) -> Option<TokenType> {
        Some(match code {
            1 => TokenType::U8,
            2 => TokenType::I8,
            3 => TokenType::I16,
            4 => TokenType::I32,
            5 => TokenType::I64,
            8 => TokenType::U16,
            _ => return None,
        })
    }

    /// Parses `uint16` / `uint32` (OLMo's `--dtype`).
    pub fn parse(name: &str) -> Result<TokenType> {
        match name {
            "uint16" | "u16" => Ok(TokenType::U16),
            "uint32" | "u32" => Ok(TokenType::U32),
            other => bail!("unknown token type {other:?}; expected uint16 or uint32"),
        }
    }

    /// Token ids from little-endian bytes; a negative or too large id is an error naming `what`.
    fn decode(self, bytes: &[u8], what: &dyn Fn() -> String) -> Result<Vec<u32>> {
        let n = self.size();
        let mut out = Vec::with_capacity(bytes.len() / n);
        for c in bytes.chunks_exact(n) {
            let v: i128 = match self {
                TokenType::U8 => i128::from(c[0]),
                TokenType::I8 => i128::from(c[0] as i8),
                TokenType::I16 => i128::from(i16::from_le_bytes([c[0], c[1]])),
                TokenType::U16 => i128::from(u16::from_le_bytes([c[0], c[1]])),
                TokenType::I32 => i128::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                TokenType::U32 => i128::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                TokenType::I64 => i128::from(i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
            };
            match u32::try_from(v) {
                Ok(t) => out.push(t),
                Err(_) => bail!("{}: token id {v} is not a vocabulary index", what()),
            }
        }
        Ok(out)
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// A source of training sequences in data order: position `p` is the `p`-th sequence the model saw.
pub trait DataOrder {
    /// Positions in the order (sequences the data holds for training).
    fn positions(&self) -> u64;
    /// The instance at position `p`: its id (unique per distinct sequence) and tokens, the first
    /// `truncate` of them when given.
    fn instance(&self, p: u64, truncate: Option<usize>) -> Result<(u64, Vec<u32>)>;
}

/// A Megatron / GPT-NeoX memory-mapped indexed dataset (`PREFIX.idx` + `PREFIX.bin`).
#[derive(Debug)]
pub struct IndexedDataset {
    prefix: PathBuf,
    idx: memmap2::Mmap,
    bin: memmap2::Mmap,
    dtype: TokenType,
    len: usize,
    sizes_at: usize,
    pointers_at: usize,
    /// Expected tokens per row (`None`: any).
    seq_len: Option<usize>,
}

/// The index file's magic bytes.
const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";

impl IndexedDataset {
    /// Opens `PREFIX.idx` and `PREFIX.bin` (a trailing `.idx` or `.bin` on `prefix` is ignored). The
    /// header, the index's size and the last row's extent in `.bin` are checked now; every row read is
    /// checked again.
    pub fn open(prefix: &Path) -> Result<Self> {
        let text = prefix.to_string_lossy();
        let prefix = match text.strip_suffix(".idx").or_else(|| text.strip_suffix(".bin")) {
            Some(p) => PathBuf::from(p),
            None => prefix.to_path_buf(),
        };
        let with = |ext: &str| {
            let mut p = prefix.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        let (idx_path, bin_path) = (with(".idx"), with(".bin"));
        let idx = map(&idx_path)?;
        let bad = |message: String| LmError::Input(format!("{}: {message}", idx_path.display()));
        if idx.len() < 34 || &idx[..9] != MAGIC {
            return Err(bad("not a memory-mapped indexed dataset index (expected the MMIDIDX header)".into()));
        }
        let version = u64_at(&idx, 9);
        if version != 1 {
            return Err(bad(format!("index version {version}, expected 1")));
        }
        let code = idx[17];
        let Some(dtype) = TokenType::megatron(code) else {
            return Err(bad(format!(
                "dtype code {code} is not an integer token type (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)"
            )));
        };
        let len = usize::try_from(u64_at(&idx, 18)).map_err(|_| bad("row count does not fit this machine".into()))?;
        let docs = usize::try_from(u64_at(&idx, 26)).map_err(|_| bad("document count does not fit".into()))?;
        let need = len.checked_mul(12).and_then(|x| docs.checked_mul(8).and_then(|d| x.checked_add(d)));
        match need.and_then(|n| n.checked_add(34)) {
            Some(n) if n <= idx.len() => {}
            _ => {
                return Err(bad(format!(
                    "{} bytes, fewer than the header's {len} rows and {docs} document entries need",
                    idx.len()
                )));
            }
        }
        let bin = map(&bin_path)?;
        // Draws read scattered rows: no read-ahead around each (a hint; failing to give it is harmless).
        #[cfg(unix)]
        let _ = (idx.advise(memmap2::Advice::Random), bin.advise(memmap2::Advice::Random));
        let d = IndexedDataset { prefix, idx, bin, dtype, len, sizes_at: 34, pointers_at: 34 + 4 * len, seq_len: None };
        if len > 0 {
            d.extent(len - 1)?;
        }
        Ok(d)
    }

    /// Requires every row read to hold exactly `tokens` tokens (Pythia's 2,049).
    pub fn with_seq_len(mut self, tokens: usize) -> Self {
        self.seq_len = Some(tokens);
        self
    }

    /// Rows in the dataset.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The token type.
    pub fn dtype(&self) -> TokenType {
        self.dtype
    }

    /// Tokens in row `r`; a row beyond the dataset or a negative size is an error.
    pub fn row_len(&self, r: usize) -> Result<usize> {
        ensure!(r < self.len, "{}: row {r} is beyond its {} rows", self.prefix.display(), self.len);
        let at = self.sizes_at + 4 * r;
        let n = i32::from_le_bytes([self.idx[at], self.idx[at + 1], self.idx[at + 2], self.idx[at + 3]]);
        match usize::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => bail!("{}.idx: row {r} has the size {n}", self.prefix.display()),
        }
    }

    /// Row `r`'s byte range in `.bin`, checked against the file.
    fn extent(&self, r: usize) -> Result<(usize, usize)> {
        let bytes = self.row_len(r)? * self.dtype.size();
        let ptr = u64_at(&self.idx, self.pointers_at + 8 * r);
        let end = usize::try_from(ptr).ok().and_then(|p| p.checked_add(bytes));
        match end {
            Some(end) if end <= self.bin.len() => Ok((end - bytes, end)),
            _ => bail!(
                "{}.bin: {} bytes, shorter than the index says (row {r} ends at byte {})",
                self.prefix.display(),
                self.bin.len(),
                u128::from(ptr) + bytes as u128
            ),
        }
    }

    /// Row `r`'s tokens (the first `truncate` when given).
    pub fn row(&self, r: usize, truncate: Option<usize>) -> Result<Vec<u32>> {
        let n = self.row_len(r)?;
        if let Some(want) = self.seq_len {
            ensure!(
                n == want,
                "{}: row {r} holds {n} tokens, expected {want} (the sequence length; set it to read other layouts)",
                self.prefix.display()
            );
        }
        let (start, end) = self.extent(r)?;
        let keep = truncate.map_or(n, |t| t.min(n)) * self.dtype.size();
        self.dtype
            .decode(&self.bin[start..end.min(start + keep)], &|| format!("{}.bin, row {r}", self.prefix.display()))
    }
}

impl DataOrder for IndexedDataset {
    fn positions(&self) -> u64 {
        self.len as u64
    }

    fn instance(&self, p: u64, truncate: Option<usize>) -> Result<(u64, Vec<u32>)> {
        Ok((p, self.row(p as usize, truncate)?))
    }
}

/// OLMo's data order: a `uint32` memmap of instance indices (the batch of step `s` is entries
/// `[(s − 1)·B, s·B)`) over token memmaps, where instance `i` is the `i`-th `L`-token chunk of the
/// files laid end to end (each file's remainder of fewer than `L` tokens ignored), files in the order
/// given.
#[derive(Debug)]
pub struct OlmoOrder {
    indices_path: PathBuf,
    indices: memmap2::Mmap,
    /// Byte offset of the first index (after an `.npy` header).
    indices_at: usize,
    files: Vec<(PathBuf, memmap2::Mmap, u64)>,
    dtype: TokenType,
    seq_len: usize,
}

/// The data offset of an `.npy` file holding a little-endian `uint32` vector, or 0 for a raw file.
fn npy_offset(bytes: &[u8], path: &Path) -> Result<usize> {
    if !bytes.starts_with(b"\x93NUMPY") {
        return Ok(0);
    }
    ensure!(bytes.len() >= 10, "{}: truncated .npy header", path.display());
    let (major, len_at) = (bytes[6], 8);
    let (header_len, start) = if major == 1 {
        (usize::from(u16::from_le_bytes([bytes[len_at], bytes[len_at + 1]])), len_at + 2)
    } else {
        ensure!(bytes.len() >= 12, "{}: truncated .npy header", path.display());
        let l = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        (l as usize, len_at + 4)
    };
    let end = start + header_len;
    ensure!(end <= bytes.len(), "{}: truncated .npy header", path.display());
    let header = String::from_utf8_lossy(&bytes[start..end]);
    ensure!(
        header.contains("'<u4'") && !header.contains("'fortran_order': True"),
        "{}: the .npy array must be little-endian uint32 ('<u4') in C order, found header {}",
        path.display(),
        header.trim()
    );
    Ok(end)
}

impl OlmoOrder {
    /// Opens the global indices and the token files (`dtype` tokens, instances of `seq_len`).
    pub fn open(indices: &Path, data: &[PathBuf], dtype: TokenType, seq_len: usize) -> Result<Self> {
        ensure!(seq_len >= 2, "the sequence length must be at least 2, found {seq_len}");
        ensure!(!data.is_empty(), "no token files given");
        let map_i = map(indices)?;
        let indices_at = npy_offset(&map_i, indices)?;
        ensure!(
            (map_i.len() - indices_at).is_multiple_of(4),
            "{}: {} bytes of indices, not a whole number of uint32 values",
            indices.display(),
            map_i.len() - indices_at
        );
        let mut files = Vec::with_capacity(data.len());
        for p in data {
            let m = map(p)?;
            ensure!(
                m.len().is_multiple_of(dtype.size()),
                "{}: {} bytes, not a whole number of {}-byte tokens",
                p.display(),
                m.len(),
                dtype.size()
            );
            let chunks = (m.len() / dtype.size() / seq_len) as u64;
            files.push((p.clone(), m, chunks));
        }
        Ok(OlmoOrder { indices_path: indices.to_path_buf(), indices: map_i, indices_at, files, dtype, seq_len })
    }

    /// Instances the token files hold.
    pub fn instances(&self) -> u64 {
        self.files.iter().map(|f| f.2).sum()
    }

    /// The instance index at position `p` of the order.
    pub fn index_at(&self, p: u64) -> Result<u64> {
        ensure!(
            p < self.positions(),
            "{}: position {p} is beyond its {} entries",
            self.indices_path.display(),
            self.positions()
        );
        let at = self.indices_at + 4 * p as usize;
        let b = &self.indices[at..at + 4];
        Ok(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    }

    /// Instance `i`'s tokens.
    pub fn chunk(&self, i: u64, truncate: Option<usize>) -> Result<Vec<u32>> {
        let mut rest = i;
        for (path, m, chunks) in &self.files {
            if rest < *chunks {
                let start = rest as usize * self.seq_len * self.dtype.size();
                let keep = truncate.map_or(self.seq_len, |t| t.min(self.seq_len)) * self.dtype.size();
                return self.dtype.decode(&m[start..start + keep], &|| format!("{}, instance {i}", path.display()));
            }
            rest -= chunks;
        }
        bail!(
            "{}: instance {i} is beyond the {} instances of {} tokens the token files hold (give every token file, in the training configuration's order, and its --seq-len)",
            self.indices_path.display(),
            self.instances(),
            self.seq_len
        )
    }
}

impl DataOrder for OlmoOrder {
    fn positions(&self) -> u64 {
        ((self.indices.len() - self.indices_at) / 4) as u64
    }

    fn instance(&self, p: u64, truncate: Option<usize>) -> Result<(u64, Vec<u32>)> {
        let i = self.index_at(p)?;
        Ok((i, self.chunk(i, truncate)?))
    }
}

/// A range of 1-based optimizer steps `first..=last` every `stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Steps {
    /// The first step.
    pub first: u64,
    /// The last step (included when the stride reaches it).
    pub last: u64,
    /// Steps between two analysed steps.
    pub stride: u64,
}

impl Steps {
    /// Parses `A:B` or `A:B:STRIDE` (1-based steps, `A ≤ B`).
    pub fn parse(s: &str) -> Result<Steps> {
        let parts: Vec<&str> = s.split(':').map(str::trim).collect();
        let bad =
            || format!("steps {s:?}: expected FIRST:LAST or FIRST:LAST:STRIDE with 1 ≤ FIRST ≤ LAST and STRIDE ≥ 1");
        ensure!(parts.len() == 2 || parts.len() == 3, "{}", bad());
        let n: Vec<u64> = parts.iter().map(|p| p.parse::<u64>()).collect::<Result<_, _>>().at(bad)?;
        let stride = n.get(2).copied().unwrap_or(1);
        ensure!(n[0] >= 1 && n[0] <= n[1] && stride >= 1, "{}", bad());
        Ok(Steps { first: n[0], last: n[1], stride })
    }

    fn iter(self) -> impl Iterator<Item = u64> {
        (self.first..=self.last).step_by(self.stride as usize)
    }
}

/// How instances are drawn from a data order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampling {
    /// The analysed steps (treated instances come from their batches).
    pub steps: Steps,
    /// Instances drawn per analysed step.
    pub per_step: usize,
    /// Validation instances.
    pub validation: usize,
    /// The steps validation instances come from (default: every step after the last analysed one that
    /// the data holds, before `epoch_steps`).
    pub validation_steps: Option<Steps>,
    /// Sequences per optimizer step (Pythia's 1,024).
    pub batch_size: u64,
    /// The first step of a second pass over the data, when it has one: its batches re-treat earlier
    /// sequences.
    pub epoch_steps: Option<u64>,
    /// Tokens kept from the start of each sequence.
    pub truncate: Option<usize>,
    /// Seed of the draws.
    pub seed: u64,
}

/// What [`sample`] drew.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// Treated instances written.
    pub treated: usize,
    /// Validation instances written.
    pub validation: usize,
    /// The steps validation instances were drawn from.
    pub validation_steps: Option<Steps>,
    /// Drawn sequences left out for holding nothing but the padding token 0.
    pub padding_only: usize,
    /// Drawn positions left out because an earlier draw had the same sequence (OLMo's order can repeat
    /// an instance).
    pub repeats: usize,
    /// Analysed steps at or after `epoch_steps` (their instances were seen before, in the first pass).
    pub second_pass_steps: usize,
}

/// `k` distinct values of `0..n` (Floyd's algorithm), sorted.
fn distinct(rng: &mut SplitMix64, n: u64, k: u64) -> Vec<u64> {
    let mut chosen = BTreeSet::new();
    for j in n - k..n {
        let t = rng.below(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    chosen.into_iter().collect()
}

/// One drawn instance: its id, its treatment step (`None` for validation) and its tokens.
pub type Emit<'a> = dyn FnMut(u64, Option<u64>, &[u32]) -> Result<()> + 'a;

/// Draws instances from `order` as `sampling` says: `per_step` positions of each analysed step's batch
/// (seeded per step, so a step's draw does not depend on the others) and `validation` positions from
/// the validation steps, all checked to lie inside the data. Each instance goes to `emit` as it is
/// read (treated ones by step then position, then validation ones by position), so memory does not
/// grow with the number drawn.
pub fn sample(order: &dyn DataOrder, sampling: &Sampling, emit: &mut Emit<'_>) -> Result<Sampled> {
    let b = sampling.batch_size;
    ensure!(b >= 1, "the batch size must be at least 1");
    for (what, st) in [("analysed", Some(sampling.steps)), ("validation", sampling.validation_steps)] {
        if let Some(st) = st {
            ensure!(
                st.first >= 1 && st.first <= st.last && st.stride >= 1,
                "{what} steps {}:{}:{}: expected 1 ≤ FIRST ≤ LAST and STRIDE ≥ 1",
                st.first,
                st.last,
                st.stride
            );
        }
    }
    if let Some(t) = sampling.truncate {
        ensure!(t >= 2, "truncating to {t} token(s): a sequence log-probability needs at least two");
    }
    ensure!(sampling.per_step as u64 <= b, "{} instances per step, more than a batch of {b} holds", sampling.per_step);
    let steps_in_data = order.positions() / b;
    let st = sampling.steps;
    ensure!(
        st.last <= steps_in_data,
        "step {} is beyond the data: {} sequences make {steps_in_data} steps of {b}",
        st.last,
        order.positions()
    );
    ensure!(sampling.epoch_steps != Some(0), "the second pass's first step must be a 1-based step, found 0");
    let pass_end = sampling.epoch_steps.map_or(steps_in_data, |e| (e - 1).min(steps_in_data));
    let validation_steps = match (sampling.validation, sampling.validation_steps) {
        (0, _) => None,
        (_, Some(v)) => Some(v),
        (_, None) => {
            ensure!(
                st.last < pass_end,
                "no steps after the last analysed step {} to draw validation instances from (the data's first pass ends at step {pass_end}); give the validation steps",
                st.last
            );
            Some(Steps { first: st.last + 1, last: pass_end, stride: 1 })
        }
    };
    if let Some(v) = validation_steps {
        ensure!(
            v.first > st.last,
            "validation steps {}:{} must come after the last analysed step {} (their sequences must be untrained at every analysed checkpoint)",
            v.first,
            v.last,
            st.last
        );
        ensure!(v.last <= steps_in_data, "validation step {} is beyond the data's {steps_in_data} steps", v.last);
        if let Some(e) = sampling.epoch_steps {
            ensure!(
                v.last < e,
                "validation step {} is in the second pass over the data (from step {e}): its sequences were trained in the first",
                v.last
            );
        }
        let span = (v.last - v.first + 1) * b;
        ensure!(
            sampling.validation as u64 <= span,
            "{} validation instances, more than steps {}..{} hold ({span})",
            sampling.validation,
            v.first,
            v.last
        );
    }
    let mut out = Sampled {
        treated: 0,
        validation: 0,
        validation_steps,
        padding_only: 0,
        repeats: 0,
        second_pass_steps: st.iter().filter(|s| sampling.epoch_steps.is_some_and(|e| *s >= e)).count(),
    };
    let mut seen = HashSet::new();
    let mut take = |p: u64, step: Option<u64>, out: &mut Sampled| -> Result<()> {
        // Padding is judged on the whole sequence, then it is cut.
        let (id, mut tokens) = order.instance(p, None)?;
        let padding = tokens.iter().all(|&t| t == 0);
        if let Some(t) = sampling.truncate {
            tokens.truncate(t);
        }
        if padding {
            out.padding_only += 1;
        } else if !seen.insert(id) {
            out.repeats += 1;
        } else {
            emit(id, step, &tokens)?;
            *(if step.is_some() { &mut out.treated } else { &mut out.validation }) += 1;
        }
        Ok(())
    };
    for s in st.iter() {
        let mut rng = SplitMix64::new(hash_key(sampling.seed, &s.to_le_bytes()));
        for k in distinct(&mut rng, b, sampling.per_step as u64) {
            take((s - 1) * b + k, Some(s), &mut out)?;
        }
    }
    if let Some(v) = validation_steps {
        let span = (v.last - v.first + 1) * b;
        let mut rng = SplitMix64::new(hash_key(sampling.seed, b"validation"));
        for k in distinct(&mut rng, span, sampling.validation as u64) {
            take((v.first - 1) * b + k, None, &mut out)?;
        }
    }
    Ok(out)
}

/// [`sample`] into an instances file, written as it is drawn and renamed into place when complete:
/// `{"id", "treatment_step", "tokens"}` per line. `progress` hears the number of instances written.
pub fn sample_to_file(
    order: &dyn DataOrder,
    sampling: &Sampling,
    path: &Path,
    progress: &mut dyn FnMut(usize),
) -> Result<Sampled> {
    let mut result = None;
    let written = memsteer_panel::durable::write(path, |w| {
        let (mut n, mut line) = (0, String::new());
        let mut emit = |id: u64, step: Option<u64>, tokens: &[u32]| -> Result<()> {
            // The line serde_json writes for {"id", "tokens", "treatment_step"}, formatted directly
            // (building a JSON value per line made writing the bottleneck).
            use std::fmt::Write as _;
            line.clear();
            let _ = write!(line, "{{\"id\":{id},\"tokens\":[");
            for (k, t) in tokens.iter().enumerate() {
                let _ = if k == 0 { write!(line, "{t}") } else { write!(line, ",{t}") };
            }
            let _ = match step {
                Some(s) => writeln!(line, "],\"treatment_step\":{s}}}"),
                None => writeln!(line, "],\"treatment_step\":null}}"),
            };
            w.write_all(line.as_bytes()).map_err(|source| LmError::Io { path: path.into(), source })?;
            n += 1;
            progress(n);
            Ok(())
        };
        result = Some(sample(order, sampling, &mut emit));
        match &result {
            Some(Err(_)) => Err(std::io::Error::other("sampling failed")),
            _ => Ok(()),
        }
    });
    match (result, written) {
        (Some(Err(e)), _) => Err(e),
        (_, Err(source)) => Err(LmError::Io { path: path.into(), source }),
        (Some(Ok(s)), Ok(())) => Ok(s),
        (None, Ok(())) => bail!("internal: sampling did not run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floyd_draws_are_distinct_sorted_and_seeded() {
        let mut r = SplitMix64::new(3);
        let d = distinct(&mut r, 1024, 100);
        assert_eq!(d.len(), 100);
        assert!(d.windows(2).all(|w| w[0] < w[1]) && d[99] < 1024);
        assert_eq!(d, distinct(&mut SplitMix64::new(3), 1024, 100));
        assert_eq!(distinct(&mut SplitMix64::new(1), 5, 5), vec![0, 1, 2, 3, 4]);
    }

    /// A data order of `n` positions whose sequence `p` is `[p, p + 1, p + 2]`.
    struct Counting(u64);

    impl DataOrder for Counting {
        fn positions(&self) -> u64 {
            self.0
        }
        fn instance(&self, p: u64, truncate: Option<usize>) -> Result<(u64, Vec<u32>)> {
            let mut t = vec![p as u32, p as u32 + 1, p as u32 + 2];
            t.truncate(truncate.unwrap_or(3));
            Ok((p, t))
        }
    }

    #[test]
    fn files_hold_the_lines_serde_json_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let s = Sampling {
            steps: Steps { first: 1, last: 3, stride: 2 },
            per_step: 2,
            validation: 2,
            validation_steps: None,
            batch_size: 4,
            epoch_steps: None,
            truncate: None,
            seed: 9,
        };
        let mut want = Vec::new();
        let report = sample(&Counting(40), &s, &mut |id, step, tokens| {
            want.push(serde_json::json!({"id": id, "treatment_step": step, "tokens": tokens}).to_string());
            Ok(())
        })
        .unwrap();
        let mut count = 0;
        let again = sample_to_file(&Counting(40), &s, &path, &mut |n| count = n).unwrap();
        assert_eq!((report, count), (again, 6));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().collect::<Vec<_>>(), want);
        assert!(want[5].contains("\"treatment_step\":null") && want[0].contains("\"treatment_step\":1"));
        // A failed draw leaves no file behind.
        let bad = Sampling { steps: Steps { first: 1, last: 99, stride: 1 }, ..s };
        let other = dir.path().join("y.jsonl");
        assert!(sample_to_file(&Counting(40), &bad, &other, &mut |_| {}).is_err());
        assert!(!other.exists());
    }

    #[test]
    fn steps_parse() {
        assert_eq!(Steps::parse("1:10").unwrap(), Steps { first: 1, last: 10, stride: 1 });
        assert_eq!(Steps::parse("1000:2000:250").unwrap().iter().count(), 5);
        for bad in ["0:5", "5:1", "1:5:0", "x", "1:2:3:4"] {
            assert!(Steps::parse(bad).is_err(), "{bad}");
        }
    }
}
