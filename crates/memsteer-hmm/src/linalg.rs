//! Tiny dense helpers (row-major `f64`), enough for the constructions and fits in this crate.

use memsteer_panel::rng::SplitMix64;

/// `A (n×m) · B (m×p)`.
pub(crate) fn matmul(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * p];
    for i in 0..n {
        for k in 0..m {
            let aik = a[i * m + k];
            if aik != 0.0 {
                for j in 0..p {
                    c[i * p + j] += aik * b[k * p + j];
                }
            }
        }
    }
    c
}

/// Transpose of an `n×m` matrix.
pub(crate) fn transpose(a: &[f64], n: usize, m: usize) -> Vec<f64> {
    let mut t = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            t[j * n + i] = a[i * m + j];
        }
    }
    t
}

/// A random `n×n` orthogonal matrix (Gram–Schmidt on Gaussian rows).
pub(crate) fn random_orthogonal(n: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let mut q = vec![0.0; n * n];
    let mut i = 0;
    while i < n {
        let mut v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        for r in 0..i {
            let dot: f64 = (0..n).map(|j| v[j] * q[r * n + j]).sum();
            for j in 0..n {
                v[j] -= dot * q[r * n + j];
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm < 1e-8 {
            continue;
        }
        for j in 0..n {
            q[i * n + j] = v[j] / norm;
        }
        i += 1;
    }
    q
}

/// Solves `A X = B` (`A` n×n, `B` n×p) by Gaussian elimination with partial pivoting; `None` when `A`
/// is singular to working precision.
pub(crate) fn solve(a: &[f64], b: &[f64], n: usize, p: usize) -> Option<Vec<f64>> {
    let mut a = a.to_vec();
    let mut x = b.to_vec();
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))?;
        if a[piv * n + col].abs() <= 1e-13 * scale {
            return None;
        }
        if piv != col {
            for j in 0..n {
                a.swap(piv * n + j, col * n + j);
            }
            for j in 0..p {
                x.swap(piv * p + j, col * p + j);
            }
        }
        for r in 0..n {
            if r != col {
                let f = a[r * n + col] / a[col * n + col];
                if f != 0.0 {
                    for j in col..n {
                        a[r * n + j] -= f * a[col * n + j];
                    }
                    for j in 0..p {
                        x[r * p + j] -= f * x[col * p + j];
                    }
                }
            }
        }
    }
    for r in 0..n {
        let d = a[r * n + r];
        for j in 0..p {
            x[r * p + j] /= d;
        }
    }
    Some(x)
}

/// A random probability vector with entries bounded away from zero.
pub(crate) fn random_distribution(n: usize, rng: &mut SplitMix64) -> Vec<f64> {
    let raw: Vec<f64> = (0..n).map(|_| 0.2 + rng.uniform()).collect();
    let sum: f64 = raw.iter().sum();
    raw.into_iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orthogonal_and_solve() {
        let mut rng = SplitMix64::new(3);
        let q = random_orthogonal(5, &mut rng);
        let qqt = matmul(&q, &transpose(&q, 5, 5), 5, 5, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert!((qqt[i * 5 + j] - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
        let b: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let x = solve(&q, &b, 5, 2).expect("orthogonal is invertible");
        let back = matmul(&q, &x, 5, 5, 2);
        assert!(back.iter().zip(&b).all(|(u, v)| (u - v).abs() < 1e-10));
        assert!(solve(&[1.0, 2.0, 2.0, 4.0], &[1.0, 1.0], 2, 1).is_none());
    }
}
