//! The one place this crate calls unsafe code: `f32` matrix products through `matrixmultiply`.

/// `C (m×n) = A (m×k) · Bᵀ` with `A` row-major `m×k`, `B` row-major `n×k` and `C` row-major `m×n`.
pub(crate) fn a_bt(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "sgemm shapes");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert guarantees every addressed element lies inside its slice: A[i, l] = a[i*k + l],
    // Bᵀ[l, j] = b[j*k + l] and C[i, j] = c[i*n + j] for i < m, l < k, j < n. `c` is borrowed mutably and
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
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `C (m×n) = A (m×k) · B (k×n)`, all row-major.
pub(crate) fn a_b(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "sgemm shapes");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert guarantees every addressed element lies inside its slice: A[i, l] = a[i*k + l],
    // B[l, j] = b[l*n + j] and C[i, j] = c[i*n + j]. `c` is borrowed mutably and so aliases neither input.
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
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}
