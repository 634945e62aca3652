//! bf16 matrix products with f32 accumulation: a weight matrix packed once into bf16 panels, and
//! `out = a · Wᵀ` with the activations `a` rounded to bf16 per call.
//!
//! One packed layout serves every kernel. The input dimension is padded with zeros to a multiple of
//! 32 (one AMX tile of depth, a *step*) and the `n` outputs to a multiple of 32 (a *pair* of
//! 16-output panels). For each pair and step, the two panels' 16 × 32 blocks lie one after the other,
//! each as 16 rows (input pairs `2r, 2r + 1`) of 16 outputs × 2 values: exactly two AMX B tiles, and
//! one `vdpbf16ps` operand per row. Activations are converted per call to bf16 in the matching
//! order: blocks of 32 rows, for each step two 16 × 32 tiles (AMX A tiles), row count padded to a
//! multiple of 32 with zeros. Every kernel then reads memory front to back.
//!
//! A matrix packed from f16 values keeps them exactly: each weight is split into a bf16 `hi` and a
//! bf16 `lo = w − hi` (f16's 11 significant bits fit in the two halves' 16), stored one after the
//! other along the input dimension, and the activations are written twice, so the one product
//! computes `a·hi + a·lo`.
//!
//! Each output element is a sum over the inputs in a fixed order inside one kernel call whatever the
//! thread count: work is split only into whole row or column blocks.

use rayon::prelude::*;

use crate::Result;
use crate::dispatch::{CpuKernels, cpu_kernels};

/// Outputs per panel.
pub(crate) const PANEL: usize = 16;
/// Padding of the input dimension (one AMX tile of depth).
pub(crate) const K_ALIGN: usize = 32;
/// Padding of the activation rows and of the outputs (one 32 × 32 AMX block).
pub(crate) const BLOCK: usize = 32;
/// Values in one 16 × 32 tile.
pub(crate) const TILE: usize = 16 * 32;

/// Offset of input `k` of output `j` (of a pair-block layout with `steps` steps), and likewise of
/// row `j` of the converted activations: blocks of 32, steps, halves of 16, then 16 rows of
/// 32 values, the pair's two values adjacent.
#[inline]
pub(crate) fn offset(j: usize, k: usize, steps: usize, weights: bool) -> usize {
    let (blk, half, r) = (j / BLOCK, (j % BLOCK) / PANEL, j % PANEL);
    let (step, kk) = (k / K_ALIGN, k % K_ALIGN);
    let base = ((blk * steps + step) * 2 + half) * TILE;
    if weights { base + (kk / 2) * 2 * PANEL + 2 * r + kk % 2 } else { base + r * K_ALIGN + kk }
}

/// Rows per parallel task when a product is split by rows.
const ROW_CHUNK: usize = 128;
/// Panel pairs per parallel task when a product is split by columns.
const PAIR_CHUNK: usize = 8;

/// `x` rounded to the nearest bf16 (ties to even), as bits; NaN stays NaN.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// The f32 value of bf16 bits.
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// An `n × k` weight matrix (`n` outputs, `k` inputs; PyTorch `Linear` layout) packed in bf16 for
/// [`PackedBf16::matmul_transposed`].
#[derive(Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// Padded depth of one copy of the inputs.
    kp1: usize,
    /// Whether each weight is stored as `hi + lo` (exact f16).
    split: bool,
    /// `round_up(n, 32) · kp` values in pair blocks, `kp = kp1` or `2 · kp1` when split.
    panels: Vec<u16>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBf16").field("n", &self.n).field("k", &self.k).field("split", &self.split).finish()
    }
}

/// How [`PackedBf16::pack`] reads the source matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `n × k` row-major (`nn.Linear`: outputs major).
    OutputsMajor,
    /// `k × n` row-major (GPT-2's `Conv1D`: inputs major).
    InputsMajor,
}

impl PackedBf16 {
    /// Packs `w` (f32 values; see [`Source`] for the layout), rounding each to bf16. With `exact`, each
    /// value is kept as a `hi + lo` pair of bf16 values (exact for f16 and bf16 sources, 2× the work).
    pub fn pack(w: &[f32], n: usize, k: usize, source: Source, exact: bool) -> Result<Self> {
        crate::packed::check_weight(w.len(), n, k)?;
        if source == Source::OutputsMajor {
            return Self::pack_by_rows(n, k, exact, &|j, row| row.copy_from_slice(&w[j * k..(j + 1) * k]));
        }
        let kp1 = round_up(k, K_ALIGN);
        let kp = if exact { 2 * kp1 } else { kp1 };
        let steps = kp / K_ALIGN;
        let mut data = vec![0u16; round_up(n, BLOCK) * kp];
        // Inputs major (outputs major went to pack_by_rows).
        let at = |row: usize, col: usize| w[col * n + row];
        data.par_chunks_mut(BLOCK * kp).enumerate().for_each(|(q, pair)| {
            for j in q * BLOCK..(q * BLOCK + BLOCK).min(n) {
                for i in 0..k {
                    let x = at(j, i);
                    let hi = to_bf16(x);
                    pair[offset(j % BLOCK, i, steps, true)] = hi;
                    if exact {
                        pair[offset(j % BLOCK, kp1 + i, steps, true)] = to_bf16(x - from_bf16(hi));
                    }
                }
            }
        });
        Ok(Self { n, k, kp1, split: exact, panels: data })
    }

    /// [`PackedBf16::pack`] of an outputs-major `n × k` matrix given row by row: `row(j, buf)` writes
    /// output `j`'s `k` inputs into `buf` (decoded straight from a mapped file by the caller: no `f32`
    /// copy of the whole matrix). The same panels as packing the rows laid end to end.
    pub fn pack_by_rows(n: usize, k: usize, exact: bool, row: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Result<Self> {
        let len = n.checked_mul(k).ok_or(crate::KernelError::Overflow { what: "packed weight", rows: n, cols: k })?;
        crate::packed::check_weight(len, n, k)?;
        let kp1 = round_up(k, K_ALIGN);
        let kp = if exact { 2 * kp1 } else { kp1 };
        let steps = kp / K_ALIGN;
        let mut data = vec![0u16; round_up(n, BLOCK) * kp];
        data.par_chunks_mut(BLOCK * kp).enumerate().for_each(|(q, pair)| {
            let mut buf = vec![0.0f32; k];
            for j in q * BLOCK..(q * BLOCK + BLOCK).min(n) {
                row(j, &mut buf);
                for (i, &x) in buf.iter().enumerate() {
                    let hi = to_bf16(x);
                    pair[offset(j % BLOCK, i, steps, true)] = hi;
                    if exact {
                        pair[offset(j % BLOCK, kp1 + i, steps, true)] = to_bf16(x - from_bf16(hi));
                    }
                }
            }
        });
        Ok(Self { n, k, kp1, split: exact, panels: data })
    }

    /// Outputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether values are kept exactly as `hi + lo` pairs.
    pub fn is_exact(&self) -> bool {
        self.split
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.len() * 2
    }

    fn kp(&self) -> usize {
        if self.split { 2 * self.kp1 } else { self.kp1 }
    }

    /// The value packed for output `row`, input `col` (`hi + lo` when exact; panics outside the matrix).
    pub fn get(&self, row: usize, col: usize) -> f32 {
        assert!(row < self.n && col < self.k, "({row}, {col}) is outside the {} × {} matrix", self.n, self.k);
        let steps = self.kp() / K_ALIGN;
        let v = |i: usize| from_bf16(self.panels[offset(row, i, steps, true)]);
        if !self.split {
            return v(col);
        }
        let (hi, lo) = (v(col), v(self.kp1 + col));
        // `hi + 0` would turn a stored −0 into +0.
        if lo == 0.0 { hi } else { hi + lo }
    }

    /// `out (m × n) = a (m × k) · Wᵀ` with `a` rounded to bf16 and f32 accumulation, on the kernels
    /// [`cpu_kernels`] selects, split across rayon's threads.
    pub fn matmul_transposed(&self, a: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_transposed_with(cpu_kernels()?, a, m, out)
    }

    /// [`PackedBf16::matmul_transposed`] on the kernels of `level` (at most the detected level).
    pub fn matmul_transposed_with(&self, level: CpuKernels, a: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if !crate::packed::check_product("bf16 product", level, (m, k, n), (a.len(), out.len()))? {
            return Ok(());
        }
        let kp = self.kp();
        let m_pad = round_up(m, BLOCK);
        let a16 = self.convert(a, m, true).a16;
        let pair_len = BLOCK * kp;
        let pairs = self.panels.len() / pair_len;
        if m > ROW_CHUNK || pairs <= 1 {
            // Row blocks: each task multiplies its rows by every panel.
            out.par_chunks_mut(ROW_CHUNK * n).enumerate().for_each(|(ci, oc)| {
                let rows = oc.len() / n;
                let a_rows = &a16[ci * ROW_CHUNK * kp..(ci * ROW_CHUNK + round_up(rows, BLOCK)) * kp];
                block(level, a_rows, kp, rows, &self.panels, n, oc, n);
            });
            return Ok(());
        }
        // Column blocks (few rows, e.g. decoding): each task fills its own columns, gathered after.
        crate::packed::by_column_blocks((m, n), PAIR_CHUNK * BLOCK, out, |col0, cols, buf| {
            let (p0, p1) = (col0 / BLOCK, (col0 + cols).div_ceil(BLOCK));
            let b = &self.panels[p0 * pair_len..p1 * pair_len];
            block(level, &a16[..m_pad * kp], kp, m, b, cols, buf, cols);
        });
        Ok(())
    }
}

/// Activations converted for one packed matrix: bf16 rows in the packed layout's order.
#[derive(Debug)]
pub(crate) struct Converted {
    a16: Vec<u16>,
    m: usize,
}

impl PackedBf16 {
    /// `a` (`m × k`) rounded to bf16 in the layout the kernels read (twice over when exact), split
    /// across rayon's threads when `parallel`.
    pub(crate) fn convert(&self, a: &[f32], m: usize, parallel: bool) -> Converted {
        let (k, kp) = (self.k, self.kp());
        let steps = kp / K_ALIGN;
        let mut a16 = vec![0u16; round_up(m, BLOCK) * kp];
        let one = |(dst, src): (&mut [u16], &[f32])| {
            for (i, row) in src.chunks_exact(k).enumerate() {
                for (s, seg) in row.chunks(K_ALIGN).enumerate() {
                    let at = offset(i, s * K_ALIGN, steps, false);
                    for (d, &x) in dst[at..at + seg.len()].iter_mut().zip(seg) {
                        *d = to_bf16(x);
                    }
                    if self.split {
                        let at2 = offset(i, self.kp1 + s * K_ALIGN, steps, false);
                        dst.copy_within(at..at + seg.len(), at2);
                    }
                }
            }
        };
        if parallel {
            a16.par_chunks_mut(BLOCK * kp).zip(a[..m * k].par_chunks(BLOCK * k)).for_each(one);
        } else {
            a16.chunks_mut(BLOCK * kp).zip(a[..m * k].chunks(BLOCK * k)).for_each(one);
        }
        Converted { a16, m }
    }

    /// `out (rows × width) = a · W[c0..c0 + width]ᵀ` for converted activations, on the calling thread;
    /// `c0` is a multiple of 32.
    pub(crate) fn product_cols(&self, level: CpuKernels, a: &Converted, c0: usize, width: usize, out: &mut [f32]) {
        let pair_len = BLOCK * self.kp();
        debug_assert!(c0.is_multiple_of(BLOCK) && c0 + width <= self.n);
        let b = &self.panels[c0 / BLOCK * pair_len..];
        block(level, &a.a16, self.kp(), a.m, b, width, out, width);
    }
}

/// `out[i·ldo + j] = Σ_p a[i, p] · b[j, p]` for `i < rows`, `j < cols`: `a` holds
/// `round_up(rows, 32)` bf16 rows of `kp` values, `b` the panels of `round_up(cols, 32)` outputs.
#[allow(clippy::too_many_arguments)]
fn block(level: CpuKernels, a: &[u16], kp: usize, rows: usize, b: &[u16], cols: usize, out: &mut [f32], ldo: usize) {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::bf16_block(level, a, kp, rows, b, cols, out, ldo) {
        return;
    }
    let _ = level;
    portable_block(a, kp, rows, b, cols, out, ldo);
}

fn portable_block(a: &[u16], kp: usize, rows: usize, b: &[u16], cols: usize, out: &mut [f32], ldo: usize) {
    let steps = kp / K_ALIGN;
    for i in 0..rows {
        for j0 in (0..cols).step_by(PANEL) {
            let mut acc = [0.0f32; PANEL];
            for p in 0..kp / 2 {
                let ai = offset(i, 2 * p, steps, false);
                let (a0, a1) = (from_bf16(a[ai]), from_bf16(a[ai + 1]));
                let bp = &b[offset(j0, 2 * p, steps, true)..][..2 * PANEL];
                for (c, x) in acc.iter_mut().enumerate() {
                    *x += a0 * from_bf16(bp[2 * c]);
                    *x += a1 * from_bf16(bp[2 * c + 1]);
                }
            }
            let w = PANEL.min(cols - j0);
            out[i * ldo + j0..i * ldo + j0 + w].copy_from_slice(&acc[..w]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even neighbour, 1.
        assert_eq!(from_bf16(to_bf16(1.0 + 2f32.powi(-8))), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 * 2f32.powi(-8))), 1.0 + 2.0 * 2f32.powi(-7));
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(-0.0)).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn exact_packing_keeps_f16_values() {
        // Every finite f16 value is hi + lo exactly.
        let vals: Vec<f32> = (0..=0x7bffu16).step_by(7).map(f16_to_f32).flat_map(|v| [v, -v]).collect();
        let n = vals.len() / 4;
        let p = PackedBf16::pack(&vals[..n * 4], n, 4, Source::OutputsMajor, true).unwrap();
        for r in 0..n {
            for c in 0..4 {
                assert_eq!(p.get(r, c), vals[r * 4 + c], "row {r} col {c}");
            }
        }
    }

    /// f16 bits to f32 (normal and subnormal values), independent of the `half` crate.
    fn f16_to_f32(h: u16) -> f32 {
        let exp = (h >> 10) & 0x1f;
        let man = f32::from(h & 0x3ff);
        if exp == 0 { man * 2f32.powi(-24) } else { (1.0 + man / 1024.0) * 2f32.powi(i32::from(exp) - 15) }
    }
}
