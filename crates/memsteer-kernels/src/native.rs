//! The one place this crate calls unsafe code: `f32` matrix products through `matrixmultiply`, and
//! their split across rayon's threads.
//!
//! Every entry point checks, with overflow-checked arithmetic, that each element its shapes and
//! strides address lies inside the slices it was given, and returns [`KernelError::Shape`] or
//! [`KernelError::Overflow`] otherwise. `matrixmultiply` is called single-threaded; parallelism comes
//! from splitting the output into disjoint row or column blocks. Each output element is the same
//! `k`-ordered sum whatever the split, so results are identical across thread counts.
#![allow(unsafe_code)]

use rayon::prelude::*;

use crate::{KernelError, Result};

use crate::{MatMut, MatRef};

/// Number of slice elements spanned by a `rows × cols` view with strides `(rs, cs)`.
pub(crate) fn span(what: &'static str, rows: usize, cols: usize, rs: usize, cs: usize) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    let overflow = || KernelError::Overflow { what, rows, cols };
    let last = (rows - 1)
        .checked_mul(rs)
        .and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)))
        .and_then(|x| x.checked_add(1))
        .ok_or_else(overflow)?;
    // Strides and offsets are handed to matrixmultiply as isize.
    if isize::try_from(last).is_err() || isize::try_from(rs).is_err() || isize::try_from(cs).is_err() {
        return Err(overflow());
    }
    Ok(last)
}

fn check(what: &'static str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Result<()> {
    let need = span(what, rows, cols, rs, cs)?;
    if len < need {
        return Err(KernelError::Shape { what, expected: format!("at least {need}"), found: len });
    }
    Ok(())
}

/// Whether distinct `(i, j)` of an `m × n` view with strides `(rs, cs)` address distinct elements
/// (sufficient: one stride steps over a whole row or column of the other).
fn distinct(m: usize, n: usize, rs: usize, cs: usize) -> bool {
    match (m > 1, n > 1) {
        (false, false) => true,
        (true, false) => rs != 0,
        (false, true) => cs != 0,
        (true, true) => {
            (cs >= 1 && n.checked_mul(cs).is_some_and(|w| rs >= w))
                || (rs >= 1 && m.checked_mul(rs).is_some_and(|h| cs >= h))
        }
    }
}

/// `C (m×n) = A (m×k) · B (k×n) + β C`, strided, single-threaded.
pub(crate) fn gemm(m: usize, k: usize, n: usize, a: MatRef<'_>, b: MatRef<'_>, beta: f32, c: MatMut<'_>) -> Result<()> {
    check("a", a.data.len(), m, k, a.rs, a.cs)?;
    check("b", b.data.len(), k, n, b.rs, b.cs)?;
    check("c", c.data.len(), m, n, c.rs, c.cs)?;
    if !distinct(m, n, c.rs, c.cs) {
        return Err(KernelError::Shape {
            what: "c",
            expected: format!("strides that give each of the {m} × {n} elements its own place"),
            found: c.data.len(),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let x = &mut c.data[i * c.rs + j * c.cs];
                *x = if beta == 0.0 { 0.0 } else { beta * *x };
            }
        }
        return Ok(());
    }
    // SAFETY: `check` proved that every addressed element lies inside its slice: A[i, l] =
    // a[i·rs + l·cs] for i < m, l < k (and likewise B, C), and that the strides fit in isize. `c` is
    // borrowed mutably and so aliases neither input.
    unsafe {
        raw(
            m,
            k,
            n,
            a.data.as_ptr(),
            (a.rs, a.cs),
            b.data.as_ptr(),
            (b.rs, b.cs),
            beta,
            c.data.as_mut_ptr(),
            (c.rs, c.cs),
        )
    }
    Ok(())
}

/// # Safety
/// Every element addressed by the shapes and strides must be valid (reads for `a`, `b`; writes for
/// `c`), `c` must not overlap `a` or `b`, and strides must fit in `isize`.
#[allow(clippy::too_many_arguments)] // the BLAS signature
unsafe fn raw(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    (ars, acs): (usize, usize),
    b: *const f32,
    (brs, bcs): (usize, usize),
    beta: f32,
    c: *mut f32,
    (crs, ccs): (usize, usize),
) {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a,
            ars as isize,
            acs as isize,
            b,
            brs as isize,
            bcs as isize,
            beta,
            c,
            crs as isize,
            ccs as isize,
        );
    }
}

/// A pointer that may cross threads: each thread writes a disjoint block of the output.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
impl SendPtr {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: the blocks written through copies of this pointer are disjoint (see `par_gemm`).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Products smaller than this many multiply-adds run on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// `C (m×n) = A (m×k) · op(B)` with contiguous row-major matrices; `op(B) = B` (`b` is `k×n`) or `Bᵀ`
/// (`b` is `n×k`, PyTorch `Linear` weights). Split across rayon's threads by rows when `m` is large,
/// by columns otherwise.
pub(crate) fn par_gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    b_transposed: bool,
    c: &mut [f32],
) -> Result<()> {
    let (brs, bcs) = if b_transposed { (1, k) } else { (n, 1) };
    check("a", a.len(), m, k, k, 1)?;
    check("b", b.len(), k, n, brs, bcs)?;
    check("c", c.len(), m, n, n, 1)?;
    // Exactly the matrices, so that every split sees the same rows.
    let (a, c) = (&a[..m * k], &mut c[..m * n]);
    let threads = rayon::current_num_threads();
    let work = m.saturating_mul(k).saturating_mul(n);
    if threads == 1 || work < PARALLEL_MIN_WORK || k == 0 {
        return gemm(
            m,
            k,
            n,
            MatRef { data: a, rs: k, cs: 1 },
            MatRef { data: b, rs: brs, cs: bcs },
            0.0,
            MatMut { data: c, rs: n, cs: 1 },
        );
    }
    if m >= 32 * threads {
        // Row blocks: safe disjoint chunks of A and C.
        let rows = m.div_ceil(2 * threads).max(16);
        return c.par_chunks_mut(rows * n).zip(a.par_chunks(rows * k)).try_for_each(|(c, a)| {
            let r = c.len() / n;
            gemm(
                r,
                k,
                n,
                MatRef { data: a, rs: k, cs: 1 },
                MatRef { data: b, rs: brs, cs: bcs },
                0.0,
                MatMut { data: c, rs: n, cs: 1 },
            )
        });
    }
    // Column blocks of C (strided, disjoint) for short, wide products such as decoding one token.
    let cols = n.div_ceil(2 * threads).max(16);
    let ptr = SendPtr(c.as_mut_ptr());
    (0..n.div_ceil(cols)).into_par_iter().for_each(|blk| {
        let j0 = blk * cols;
        let w = cols.min(n - j0);
        // SAFETY: `check` above proved A (m×k), B (k×n through (brs, bcs)) and C (m×n, row-major) lie
        // inside their slices; block `blk` reads B's columns j0..j0+w and writes C's columns j0..j0+w
        // of every row, which no other block touches, so writes are disjoint and in bounds. `c` is a
        // unique borrow, so it overlaps neither input.
        unsafe {
            raw(m, k, w, a.as_ptr(), (k, 1), b.as_ptr().add(j0 * bcs), (brs, bcs), 0.0, ptr.get().add(j0), (n, 1))
        }
    });
    Ok(())
}
