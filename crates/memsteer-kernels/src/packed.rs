//! What the packed products (bf16 in [`crate::bf16`], f32 in [`crate::f32panels`]) share: the checks
//! of their operands and the column split of few-row products.

use rayon::prelude::*;

use crate::dispatch::CpuKernels;
use crate::{KernelError, Result};

/// Fills `out` (`m × n`, row-major) by blocks of `chunk` columns made in parallel: `fill(c0, width, buf)`
/// writes the `m × width` block starting at column `c0` into `buf` (row stride `width`); the blocks are
/// gathered into `out` after (the column split of few-row products, bf16 and f32).
pub(crate) fn by_column_blocks(
    (m, n): (usize, usize),
    chunk: usize,
    out: &mut [f32],
    fill: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let blocks: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|t| {
            let (c0, width) = (t * chunk, chunk.min(n - t * chunk));
            let mut buf = vec![0.0f32; m * width];
            fill(c0, width, &mut buf);
            (c0, buf)
        })
        .collect();
    for (c0, buf) in blocks {
        let width = buf.len() / m;
        for (i, row) in buf.chunks_exact(width).enumerate() {
            out[i * n + c0..i * n + c0 + width].copy_from_slice(row);
        }
    }
}

/// Checks a weight matrix to pack: `len` values for `n × k`, neither dimension zero.
pub(crate) fn check_weight(len: usize, n: usize, k: usize) -> Result<()> {
    let need = n.checked_mul(k).ok_or(KernelError::Overflow { what: "packed weight", rows: n, cols: k })?;
    if len != need {
        return Err(KernelError::Shape { what: "packed weight", expected: need.to_string(), found: len });
    }
    if n == 0 || k == 0 {
        return Err(KernelError::Unsupported {
            what: "packed weight",
            message: format!("a {n} × {k} matrix is empty; expected at least one row and one column"),
        });
    }
    Ok(())
}

/// Checks a packed product's kernel level against the CPU and its operands' lengths (`a` is `m × k`,
/// `out` `m × n`); false when there is nothing to compute (`m = 0`).
pub(crate) fn check_product(
    what: &'static str,
    level: CpuKernels,
    (m, k, n): (usize, usize, usize),
    (a_len, out_len): (usize, usize),
) -> Result<bool> {
    if level > CpuKernels::detected() {
        return Err(KernelError::Unsupported {
            what,
            message: format!("{level} kernels are not available on this CPU ({})", crate::dispatch::cpu_summary()),
        });
    }
    let need_a = m.checked_mul(k).ok_or(KernelError::Overflow { what: "a", rows: m, cols: k })?;
    let need_out = m.checked_mul(n).ok_or(KernelError::Overflow { what: "out", rows: m, cols: n })?;
    if a_len != need_a {
        return Err(KernelError::Shape { what: "a", expected: need_a.to_string(), found: a_len });
    }
    if out_len != need_out {
        return Err(KernelError::Shape { what: "out", expected: need_out.to_string(), found: out_len });
    }
    Ok(m > 0)
}
