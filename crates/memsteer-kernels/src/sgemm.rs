//! The one place this crate calls unsafe code: `f32` matrix products through `matrixmultiply`.

/// `C (m×n) = A (m×k) · op(B)` with all matrices row-major; `op(B) = B` (`b` is `k×n`) or `Bᵀ` (`b` is
/// `n×k`).
fn gemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], b_transposed: bool, c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm shapes");
    if m == 0 || n == 0 {
        return;
    }
    // op(B)[l, j] = b[l*n + j], or b[j*k + l] when transposed.
    let (rsb, csb) = if b_transposed { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the assert guarantees every addressed element lies inside its slice: A[i, l] = a[i*k + l],
    // op(B)[l, j] as above and C[i, j] = c[i*n + j] for i < m, l < k, j < n. `c` is borrowed mutably and
    // so aliases neither input.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `C (m×n) = A (m×k) · Bᵀ` with `B` row-major `n×k`.
pub(crate) fn a_bt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    gemm(m, k, n, a, b, true, c);
}

/// `C (m×n) = A (m×k) · B (k×n)`, all row-major.
pub(crate) fn a_b(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    gemm(m, k, n, a, b, false, c);
}
