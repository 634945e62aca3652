//! Distribution functions and small dense linear algebra.

use statrs::distribution::{ChiSquared, ContinuousCDF, Normal};

/// Φ⁻¹(0.75) − Φ⁻¹(0.25): the interquartile range of the standard normal.
pub(crate) const NORMAL_IQR: f64 = 1.348_979_500_392_163_5;

fn std_normal() -> Normal {
    Normal::standard()
}

/// Φ⁻¹(p).
pub fn normal_quantile(p: f64) -> f64 {
    std_normal().inverse_cdf(p)
}

/// Two-sided p-value of a standard-normal statistic.
pub fn normal_two_sided_p(z: f64) -> f64 {
    2.0 * std_normal().sf(z.abs())
}

/// Upper tail of a χ² distribution with `df` degrees of freedom.
pub fn chi2_sf(x: f64, df: usize) -> f64 {
    match ChiSquared::new(df as f64) {
        Ok(d) => d.sf(x),
        Err(_) => f64::NAN,
    }
}

/// Solves `A x = b` for a symmetric positive-definite `A` (n×n row-major) by Cholesky; returns `None`
/// when `A` is not numerically positive definite (pivot below `1e-12 ·` its diagonal scale).
pub(crate) fn cholesky_solve(a: &[f64], b: &[f64]) -> Option<Vec<f64>> {
    let n = b.len();
    let mut l = a.to_vec();
    let scale = (0..n).map(|i| a[i * n + i].abs()).fold(0.0, f64::max);
    if scale.is_nan() || scale <= 0.0 {
        return None;
    }
    for j in 0..n {
        let (done, rest) = l.split_at_mut(j * n);
        let row_j = &mut rest[..n];
        for k in 0..j {
            let row_k = &done[k * n..k * n + n];
            let s: f64 = row_j[..k].iter().zip(&row_k[..k]).map(|(x, y)| x * y).sum();
            row_j[k] = (row_j[k] - s) / row_k[k];
        }
        let d = row_j[j] - row_j[..j].iter().map(|x| x * x).sum::<f64>();
        if d.is_nan() || d <= 1e-12 * scale {
            return None;
        }
        row_j[j] = d.sqrt();
    }
    // Forward then back substitution with L (lower triangle, row-major).
    let mut y = b.to_vec();
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
        y[i] = (y[i] - s) / l[i * n + i];
    }
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * y[k]).sum();
        y[i] = (y[i] - s) / l[i * n + i];
    }
    Some(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_iqr_constant() {
        assert!((normal_quantile(0.75) - normal_quantile(0.25) - NORMAL_IQR).abs() < 1e-12);
    }

    #[test]
    fn cholesky_solves_and_detects_singular() {
        let a = [4.0, 2.0, 2.0, 3.0];
        let x = cholesky_solve(&a, &[2.0, 1.0]).unwrap_or_default();
        assert!((4.0 * x[0] + 2.0 * x[1] - 2.0).abs() < 1e-12);
        assert!((2.0 * x[0] + 3.0 * x[1] - 1.0).abs() < 1e-12);
        assert!(cholesky_solve(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0]).is_none());
    }

    #[test]
    fn chi2_tail_known_value() {
        // qchisq(0.95, 3) = 7.814728
        assert!((chi2_sf(7.814_727_903, 3) - 0.05).abs() < 1e-8);
    }
}
