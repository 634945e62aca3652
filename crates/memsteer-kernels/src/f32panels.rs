//! f32 matrix products on weights packed once into panels: `out = a · Wᵀ` with an AVX-512 micro-kernel
//! of 14 rows × 32 outputs (28 accumulators; per input, two panel loads and 14 broadcasts feed 28
//! FMAs, so the kernel is bound by the FMA units rather than by loads, where matrixmultiply's 16 × 16
//! kernel issues one load per FMA and packs both operands on every call).
//!
//! Layout: the `n` outputs in panels of 32 (the last padded with zeros), each panel input-major
//! (`k` rows of 32 values). Activations are packed per call into row panels of 14, in blocks of
//! [`KC`] inputs. Each output element is `Σ_p a[i, p] · w[j, p]` accumulated in input order, one block
//! of [`KC`] inputs in registers and then added to the running sum, inside one task whatever the
//! thread count or the rows around it: results are bitwise identical across thread counts and batch
//! compositions. Without AVX-512 the same order runs in portable Rust (separate multiply and add, so
//! its results differ from the AVX-512 kernel's in the last bits).

use rayon::prelude::*;

use crate::Result;
use crate::bf16::Source;
use crate::dispatch::{CpuKernels, cpu_kernels};

/// Outputs per panel.
pub(crate) const NR: usize = 32;
/// Rows per micro-kernel call.
pub(crate) const MR: usize = 14;
/// Inputs per block. A block of 768 (GPT-2 small's and most hidden sizes up to it in one block)
/// writes each output tile once for those products instead of adding to it three times: its panel
/// block (96 KiB) lives in L2 rather than L1, which costs less than re-reading the output tiles
/// (2,048-row GPT-2 shapes, one thread, medians of interleaved runs: 87 → 107 GFLOP/s at
/// 768 × 2,304, 90 → 100 at 3,072 × 768, with the tile prefetch of the micro-kernel).
pub(crate) const KC: usize = 768;
/// Fewest and most rows per parallel task when a product is split by rows (multiples of [`MR`]):
/// each task streams every panel once per input block, so larger tasks read the weights fewer times
/// (measured on 2048-row GPT-2 shapes, one thread: 60–75 GFLOP/s with 112-row tasks, 87–96 with 518).
const MIN_ROW_TASK: usize = 8 * MR;
const MAX_ROW_TASK: usize = 48 * MR;
/// Panels per parallel task when a product is split by columns.
const PANEL_CHUNK: usize = 4;

/// An `n × k` weight matrix (`n` outputs, `k` inputs) packed for [`PackedF32::matmul_transposed`].
#[derive(Clone)]
pub struct PackedF32 {
    n: usize,
    k: usize,
    /// `ceil(n / 32)` panels of `k × 32` values.
    panels: Vec<f32>,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedF32").field("n", &self.n).field("k", &self.k).finish()
    }
}

/// Activations packed for one [`PackedF32`]: row panels of [`MR`] (zero-padded), and within each block
/// of [`KC`] inputs, input-major (`kc` rows of [`MR`] values).
#[derive(Debug)]
pub(crate) struct PackedRows<'a> {
    data: &'a [f32],
    m: usize,
}

thread_local! {
    /// Each thread's buffer for packed activations, reused across calls (a fresh multi-megabyte
    /// buffer per product costs page faults). It never shrinks, and needs not: a call packs at most
    /// [`MAX_ROW_TASK`] rows (a row task; the fused output layer's token blocks are smaller) of the
    /// widest product's `k`, so it is bounded by the model's shape, not by the batch: 672 × 4,864 f32
    /// = 13 MB per thread for Qwen2.5-0.5B's MLP, 672 × 14,336 = 39 MB for Llama 3 8B's. Column-split
    /// products (few rows) use a buffer of their own per call.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

impl PackedF32 {
    /// Packs `w` (see [`Source`] for its layout).
    pub fn pack(w: &[f32], n: usize, k: usize, source: Source) -> Result<Self> {
        crate::packed::check_weight(w.len(), n, k)?;
        if source == Source::OutputsMajor {
            return Self::pack_by_rows(n, k, &|j, row| row.copy_from_slice(&w[j * k..(j + 1) * k]));
        }
        Self::pack_by_input_rows(n, k, &|i, j0, dst| dst.copy_from_slice(&w[i * n + j0..i * n + j0 + dst.len()]))
    }

    /// [`PackedF32::pack`] of an inputs-major `n × k` matrix (`k` rows of `n` outputs, GPT-2's layout)
    /// given by pieces of its rows: `segment(i, j0, buf)` writes outputs `j0..j0 + buf.len()` of input
    /// `i` into `buf` (decoded straight from a mapped file by the caller). The same panels as packing
    /// the rows laid end to end.
    pub fn pack_by_input_rows(n: usize, k: usize, segment: &(dyn Fn(usize, usize, &mut [f32]) + Sync)) -> Result<Self> {
        let len = n.checked_mul(k).ok_or(crate::KernelError::Overflow { what: "packed weight", rows: n, cols: k })?;
        crate::packed::check_weight(len, n, k)?;
        let mut panels = vec![0.0f32; n.div_ceil(NR) * NR * k];
        panels.par_chunks_mut(NR * k).enumerate().for_each(|(p, panel)| {
            // Each input's 32 outputs are contiguous in the source.
            let (j0, cols) = (p * NR, NR.min(n - p * NR));
            for (i, dst) in panel.chunks_exact_mut(NR).enumerate() {
                segment(i, j0, &mut dst[..cols]);
            }
        });
        Ok(Self { n, k, panels })
    }

    /// [`PackedF32::pack`] of an outputs-major `n × k` matrix given row by row: `row(j, buf)` writes
    /// output `j`'s `k` inputs into `buf` (a caller decodes them straight from a mapped file, so that no
    /// `f32` copy of the whole matrix exists). The same panels as packing the rows laid end to end.
    pub fn pack_by_rows(n: usize, k: usize, row: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Result<Self> {
        let len = n.checked_mul(k).ok_or(crate::KernelError::Overflow { what: "packed weight", rows: n, cols: k })?;
        crate::packed::check_weight(len, n, k)?;
        let mut panels = vec![0.0f32; n.div_ceil(NR) * NR * k];
        panels.par_chunks_mut(NR * k).enumerate().for_each(|(p, panel)| {
            let (j0, cols) = (p * NR, NR.min(n - p * NR));
            let mut buf = vec![0.0f32; k];
            // Each output's inputs are contiguous in the source.
            for jj in 0..cols {
                row(j0 + jj, &mut buf);
                for (i, &x) in buf.iter().enumerate() {
                    panel[i * NR + jj] = x;
                }
            }
        });
        Ok(Self { n, k, panels })
    }

    /// Outputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.panels.len() * 4
    }

    /// The value packed for output `row`, input `col` (panics outside the matrix).
    pub fn get(&self, row: usize, col: usize) -> f32 {
        assert!(row < self.n && col < self.k, "({row}, {col}) is outside the {} × {} matrix", self.n, self.k);
        self.panels[(row / NR) * NR * self.k + col * NR + row % NR]
    }

    /// Output `row`'s `k` values into `out` (panics outside the matrix or when `out` is not `k` long).
    pub fn row_into(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.n && out.len() == self.k,
            "row {row} of the {} × {} matrix into {}",
            self.n,
            self.k,
            out.len()
        );
        let panel = &self.panels[(row / NR) * NR * self.k..(row / NR + 1) * NR * self.k];
        for (o, x) in out.iter_mut().zip(panel[row % NR..].iter().step_by(NR)) {
            *o = *x;
        }
    }

    /// `out (m × n) = a (m × k) · Wᵀ` on the kernels [`cpu_kernels`] selects (AVX-512 from
    /// [`CpuKernels::Avx512`] up, portable below), split across rayon's threads.
    pub fn matmul_transposed(&self, a: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        self.matmul_transposed_with(cpu_kernels()?, a, m, out)
    }

    /// [`PackedF32::matmul_transposed`] on the kernels of `level` (at most the detected level).
    pub fn matmul_transposed_with(&self, level: CpuKernels, a: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if !crate::packed::check_product("f32 product", level, (m, k, n), (a.len(), out.len()))? {
            return Ok(());
        }
        let panels = n.div_ceil(NR);
        if m > MIN_ROW_TASK || panels <= PANEL_CHUNK {
            // Row blocks: each task packs its rows and multiplies them by every panel.
            let task = m.div_ceil(2 * rayon::current_num_threads()).div_ceil(MR) * MR;
            let task = task.clamp(MIN_ROW_TASK, MAX_ROW_TASK);
            out.par_chunks_mut(task * n).zip(a.par_chunks(task * k)).for_each(|(oc, ac)| {
                let rows = oc.len() / n;
                self.with_packed_rows(ac, rows, |packed| self.product(level, packed, (0, n), oc, n));
            });
            return Ok(());
        }
        // Column blocks (few rows, e.g. decoding): the rows packed once, each task its own panels.
        let mut data = Vec::new();
        let packed = self.pack_rows(a, m, &mut data);
        crate::packed::by_column_blocks((m, n), PANEL_CHUNK * NR, out, |c0, width, buf| {
            self.product(level, &packed, (c0, width), buf, width);
        });
        Ok(())
    }

    /// Runs `f` on `a` (`m × k`) packed in this thread's reusable buffer.
    pub(crate) fn with_packed_rows<R>(&self, a: &[f32], m: usize, f: impl FnOnce(&PackedRows<'_>) -> R) -> R {
        // Taken out for the call and put back after, so that no borrow is held while `f` runs.
        let mut data = SCRATCH.take();
        let r = f(&self.pack_rows(a, m, &mut data));
        SCRATCH.set(data);
        r
    }

    /// `a` (`m × k`, row-major) packed for [`PackedF32::product`] into `data` (grown when too short;
    /// every value of the packed part is written, so nothing is cleared first).
    pub(crate) fn pack_rows<'d>(&self, a: &[f32], m: usize, data: &'d mut Vec<f32>) -> PackedRows<'d> {
        let k = self.k;
        let need = m.div_ceil(MR) * MR * k;
        if data.len() < need {
            data.resize(need, 0.0);
        }
        let data = &mut data[..need];
        for (rp, dst) in data.chunks_exact_mut(MR * k).enumerate() {
            let rows = MR.min(m - rp * MR);
            pack_panel(&a[rp * MR * k..(rp * MR + rows) * k], k, rows, dst);
        }
        PackedRows { data, m }
    }

    /// `out[i·ldo + j] = (a · Wᵀ)[i, c0 + j]` for `i < a.m`, `j < width`, on the calling thread; `c0`
    /// is a multiple of 32.
    pub(crate) fn product(
        &self,
        level: CpuKernels,
        a: &PackedRows<'_>,
        (c0, width): (usize, usize),
        out: &mut [f32],
        ldo: usize,
    ) {
        let k = self.k;
        debug_assert!(c0.is_multiple_of(NR) && c0 + width <= self.n && width <= ldo);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for pj in 0..width.div_ceil(NR) {
                let cols = NR.min(width - pj * NR);
                let p = c0 / NR + pj;
                let b = &self.panels[p * NR * k + k0 * NR..p * NR * k + (k0 + kc) * NR];
                for rp in 0..a.m.div_ceil(MR) {
                    let rows = MR.min(a.m - rp * MR);
                    let ap = &a.data[rp * MR * k + k0 * MR..rp * MR * k + (k0 + kc) * MR];
                    let o = &mut out[rp * MR * ldo + pj * NR..];
                    block(level, (ap, b, kc), (rows, cols), (o, ldo), k0 > 0);
                }
            }
        }
    }
}

/// One row panel: `dst[p·MR + i] = src[i·k + p]` for `i < rows ≤ MR`, zero for the rows after (every
/// value of `dst`, `k · MR` of them, is written). A transposition, so every kernel level packs alike.
fn pack_panel(src: &[f32], k: usize, rows: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::f32_pack_panel(src, k, rows, dst) {
        return;
    }
    pack_panel_scalar(src, k, rows, dst, 0);
}

/// [`pack_panel`] without AVX-512, for inputs `from..k` (the AVX-512 packing's ragged tail too).
pub(crate) fn pack_panel_scalar(src: &[f32], k: usize, rows: usize, dst: &mut [f32], from: usize) {
    for (p, d) in dst.chunks_exact_mut(MR).enumerate().skip(from) {
        for (i, x) in d.iter_mut().enumerate() {
            *x = if i < rows { src[i * k + p] } else { 0.0 };
        }
    }
}

/// One micro-kernel call: `out[i·ldo + j] (+)= Σ_p a[p·MR + i] · b[p·NR + j]` over `p < kc`, for
/// `i < rows ≤ MR`, `j < cols ≤ NR`; added to `out` when `accumulate`.
fn block(
    level: CpuKernels,
    (a, b, kc): (&[f32], &[f32], usize),
    (rows, cols): (usize, usize),
    (out, ldo): (&mut [f32], usize),
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::x86::f32_block(level, (a, b, kc), (rows, cols), (out, ldo), accumulate) {
        return;
    }
    let _ = level;
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        let (ar, br) = (&a[p * MR..(p + 1) * MR], &b[p * NR..(p + 1) * NR]);
        for (acc_i, &x) in acc.iter_mut().zip(ar) {
            for (c, &w) in acc_i.iter_mut().zip(br) {
                *c += x * w;
            }
        }
    }
    for (i, acc_i) in acc.iter().enumerate().take(rows) {
        let row = &mut out[i * ldo..i * ldo + cols];
        for (o, &v) in row.iter_mut().zip(acc_i) {
            *o = if accumulate { *o + v } else { v };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{MR, pack_panel, pack_panel_scalar};

    /// The packing (AVX-512 transposes where the CPU has them) against the definition, on inputs
    /// around the 16-wide transpose and every row count of a panel; `dst` starts as NaN so that a
    /// value left unwritten shows.
    #[test]
    fn pack_panel_transposes_and_zero_pads() {
        for k in [1, 7, 15, 16, 17, 31, 32, 33, 773] {
            for rows in 1..=MR {
                let src: Vec<f32> = (0..rows * k).map(|i| i as f32 * 0.5 - 3.0).collect();
                fn scalar(src: &[f32], k: usize, rows: usize, dst: &mut [f32]) {
                    pack_panel_scalar(src, k, rows, dst, 0);
                }
                for pack in [pack_panel, scalar] {
                    let mut dst = vec![f32::NAN; k * MR];
                    pack(&src, k, rows, &mut dst);
                    for p in 0..k {
                        for i in 0..MR {
                            let want = if i < rows { src[i * k + p] } else { 0.0 };
                            assert_eq!(dst[p * MR + i].to_bits(), want.to_bits(), "k={k} rows={rows} p={p} i={i}");
                        }
                    }
                }
            }
        }
    }
}
