//! The one place this crate calls unsafe code: dense matrix products through `matrixmultiply`.
#![allow(unsafe_code)]

use crate::{DidError, Result};

/// `rows × cols` as a checked element count.
fn elements(what: &'static str, rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols).ok_or(DidError::ShapeOverflow { what, rows, cols })
}

/// A row stride as `isize`.
fn stride(what: &'static str, rows: usize, cols: usize) -> Result<isize> {
    isize::try_from(cols).map_err(|_| DidError::ShapeOverflow { what, rows, cols })
}

fn check_len(what: &'static str, needed: usize, found: usize) -> Result<()> {
    if found < needed { Err(DidError::ShapeMismatch { what, needed, found }) } else { Ok(()) }
}

/// `C (m×n) = α · Aᵀ B + β C` where `A` is `k×m` row-major (so `Aᵀ` is `m×k`), `B` is `k×n`
/// row-major and `C` is `m×n` row-major.
///
/// Every shape product is checked: a product that overflows `usize`, a stride that overflows `isize`
/// or a buffer shorter than its shape is an error, never undefined behaviour.
#[allow(clippy::too_many_arguments)] // the BLAS signature
pub(crate) fn at_b(
    m: usize,
    k: usize,
    n: usize,
    alpha: f64,
    a: &[f64],
    b: &[f64],
    beta: f64,
    c: &mut [f64],
) -> Result<()> {
    check_len("A", elements("A", k, m)?, a.len())?;
    check_len("B", elements("B", k, n)?, b.len())?;
    check_len("C", elements("C", m, n)?, c.len())?;
    let (rsa, rsb, rsc) = (stride("A", k, m)?, stride("B", k, n)?, stride("C", m, n)?);
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the checks above guarantee that k·m, k·n and m·n do not overflow and that every element
    // addressed through the given shapes and strides lies inside the slices: A[i, l] = a[l*m + i] with
    // i < m, l < k; B[l, j] = b[l*n + j]; C[i, j] = c[i*n + j]. The strides fit in `isize`. `c` is
    // borrowed mutably, so it aliases neither `a` nor `b`.
    unsafe {
        matrixmultiply::dgemm(m, k, n, alpha, a.as_ptr(), 1, rsa, b.as_ptr(), rsb, 1, beta, c.as_mut_ptr(), rsc, 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::DidError;

    #[test]
    fn at_b_matches_naive_product() {
        let (m, k, n) = (3, 4, 5);
        let a: Vec<f64> = (0..k * m).map(|x| x as f64 * 0.5 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|x| (x as f64).sin()).collect();
        let mut c = vec![1.0; m * n];
        super::at_b(m, k, n, 2.0, &a, &b, 0.5, &mut c).expect("shapes fit");
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|l| a[l * m + i] * b[l * n + j]).sum();
                assert!((c[i * n + j] - (2.0 * dot + 0.5)).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn overflowing_shapes_are_errors() {
        let (a, b, mut c) = (vec![0.0; 4], vec![0.0; 4], vec![0.0; 4]);
        let big = usize::MAX / 2 + 1;
        // k·m overflows.
        let e = super::at_b(2, big, 2, 1.0, &a, &b, 0.0, &mut c).expect_err("k·m overflows");
        assert!(matches!(e, DidError::ShapeOverflow { what: "A", .. }), "{e}");
        // m·n overflows with k = 0 (A and B are empty).
        let e = super::at_b(big, 0, 4, 1.0, &[], &[], 0.0, &mut c).expect_err("m·n overflows");
        assert!(matches!(e, DidError::ShapeOverflow { what: "C", .. }), "{e}");
        // A stride beyond isize::MAX with an empty operand.
        let e = super::at_b(big, 0, 0, 1.0, &[], &[], 0.0, &mut c).expect_err("stride overflows");
        assert!(matches!(e, DidError::ShapeOverflow { .. }), "{e}");
        // Buffers shorter than their shapes.
        let e = super::at_b(2, 2, 3, 1.0, &a, &b, 0.0, &mut c).expect_err("B too short");
        assert!(matches!(e, DidError::ShapeMismatch { what: "B", needed: 6, found: 4 }), "{e}");
    }
}
