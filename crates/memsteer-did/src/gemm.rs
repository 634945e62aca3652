//! The one place this crate calls unsafe code: dense matrix products through `matrixmultiply`.
#![allow(unsafe_code)]

/// `C (m×n) = α · Aᵀ B + β C` where `A` is `k×m` row-major (so `Aᵀ` is `m×k`), `B` is `k×n`
/// row-major and `C` is `m×n` row-major.
#[allow(clippy::too_many_arguments)] // the BLAS signature
pub(crate) fn at_b(m: usize, k: usize, n: usize, alpha: f64, a: &[f64], b: &[f64], beta: f64, c: &mut [f64]) {
    assert!(a.len() >= k * m, "A holds {} values, needs {}", a.len(), k * m);
    assert!(b.len() >= k * n, "B holds {} values, needs {}", b.len(), k * n);
    assert!(c.len() >= m * n, "C holds {} values, needs {}", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above guarantee that every element addressed through the given shapes and
    // strides lies inside the slices: A[i, l] = a[l*m + i] with i < m, l < k; B[l, j] = b[l*n + j];
    // C[i, j] = c[i*n + j]. `c` is borrowed mutably, so it aliases neither `a` nor `b`.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            1,
            m as isize,
            b.as_ptr(),
            n as isize,
            1,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn at_b_matches_naive_product() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f64> = (0..k * m).map(|x| x as f64 * 0.5 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|x| (x as f64).sin()).collect();
        let mut c = vec![1.0; m * n];
        super::at_b(m, k, n, 2.0, &a, &b, 0.5, &mut c);
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|l| a[l * m + i] * b[l * n + j]).sum();
                assert!((c[i * n + j] - (2.0 * dot + 0.5)).abs() < 1e-12);
            }
        }
    }
}
