//! Small dense linear algebra in `f64` (row-major), enough for [`crate::explain`] and [`crate::transfer`]:
//! thin QR by modified Gram–Schmidt with reorthogonalisation, one-sided Jacobi SVD of a small square
//! matrix, and Cholesky solves of symmetric positive definite systems. No external linear algebra crate.

use rayon::prelude::*;

/// Relative size below which a Gram–Schmidt residual counts as zero (the column is dependent).
const QR_DEPENDENT_RTOL: f64 = 1e-13;
/// One-sided Jacobi: columns `p`, `q` count as orthogonal when `|a_p·a_q| ≤ JACOBI_TOL · ‖a_p‖ ‖a_q‖`.
const JACOBI_TOL: f64 = 1e-15;
/// One-sided Jacobi: sweeps at most (convergence is quadratic; a handful is typical).
const JACOBI_MAX_SWEEPS: usize = 80;
/// One-sided Jacobi: rotate the pairs of a round in parallel from this many columns on.
const PARALLEL_JACOBI_MIN: usize = 64;
/// Cholesky: a pivot at most `CHOLESKY_RTOL · n · max diagonal` means the matrix is singular to working
/// precision.
const CHOLESKY_RTOL: f64 = 1e-15;
/// Rows per block when forming `XᵀX` and `XᵀY` in parallel (fixed, so results do not depend on threads).
const GRAM_BLOCK_ROWS: usize = 256;

/// `A (n×m) · B (m×p)`.
pub(crate) fn matmul(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut c = vec![0.0; n * p];
    for i in 0..n {
        let ci = &mut c[i * p..(i + 1) * p];
        for k in 0..m {
            let aik = a[i * m + k];
            if aik != 0.0 {
                for (c, &b) in ci.iter_mut().zip(&b[k * p..(k + 1) * p]) {
                    *c += aik * b;
                }
            }
        }
    }
    c
}

/// `Aᵀ (m×n) · B (n×p)` for `A` stored `n×m`.
pub(crate) fn matmul_tn(a: &[f64], b: &[f64], n: usize, m: usize, p: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * p];
    for k in 0..n {
        let bk = &b[k * p..(k + 1) * p];
        for i in 0..m {
            let aki = a[k * m + i];
            if aki != 0.0 {
                for (c, &b) in c[i * p..(i + 1) * p].iter_mut().zip(bk) {
                    *c += aki * b;
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

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Thin QR of `A` (`n×k`, row-major): `A = Q R` with `Q` `n×k` (orthonormal columns, except that a column
/// of `A` dependent on the previous ones gives a zero column of `Q` and a zero diagonal in `R`) and `R`
/// `k×k` upper triangular. Modified Gram–Schmidt, each column orthogonalised twice ("twice is enough").
/// Works for `k > n` too (the columns past the rank are zero).
pub(crate) fn thin_qr(a: &[f64], n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
    debug_assert_eq!(a.len(), n * k);
    // Columns stored contiguously.
    let mut cols: Vec<Vec<f64>> = (0..k).map(|j| (0..n).map(|i| a[i * k + j]).collect()).collect();
    let scale = cols.iter().map(|c| dot(c, c)).sum::<f64>().sqrt();
    let mut r = vec![0.0; k * k];
    let mut q: Vec<Vec<f64>> = Vec::with_capacity(k);
    for (j, col) in cols.iter_mut().enumerate() {
        for _pass in 0..2 {
            for (i, qi) in q.iter().enumerate() {
                let c = dot(qi, col);
                r[i * k + j] += c;
                for (x, &y) in col.iter_mut().zip(qi) {
                    *x -= c * y;
                }
            }
        }
        let norm = dot(col, col).sqrt();
        if norm <= QR_DEPENDENT_RTOL * scale || norm == 0.0 {
            q.push(vec![0.0; n]);
        } else {
            r[j * k + j] = norm;
            q.push(col.iter().map(|x| x / norm).collect());
        }
    }
    let mut qm = vec![0.0; n * k];
    for (j, qj) in q.iter().enumerate() {
        for i in 0..n {
            qm[i * k + j] = qj[i];
        }
    }
    (qm, r)
}

/// The singular value decomposition `A = U diag(s) Vᵀ` of a square matrix.
#[derive(Debug, Clone)]
pub(crate) struct SmallSvd {
    /// Left singular vectors, `n×n` row-major, column `i` for `s[i]` (zero for a zero singular value).
    pub u: Vec<f64>,
    /// Singular values, descending.
    pub s: Vec<f64>,
    /// Right singular vectors, `n×n` row-major, column `i` for `s[i]`.
    pub v: Vec<f64>,
}

/// SVD of a square `n×n` matrix by one-sided (Hestenes) Jacobi: plane rotations `V` orthogonalise the
/// columns of `A V`, whose norms are the singular values (high relative accuracy); sorted descending.
///
/// Pairs are visited in round-robin (tournament) order: each of the `n − 1` rounds of a sweep rotates
/// `⌊n/2⌋` disjoint column pairs, in parallel from [`PARALLEL_JACOBI_MIN`] columns on. Pairs of a round touch
/// disjoint columns, so the result is bitwise the same whatever the number of threads.
pub(crate) fn jacobi_svd(a: &[f64], n: usize) -> SmallSvd {
    debug_assert_eq!(a.len(), n * n);
    let mut cols: Vec<JacobiColumn> = (0..n)
        .map(|j| {
            let mut v = vec![0.0; n];
            v[j] = 1.0;
            JacobiColumn { a: (0..n).map(|i| a[i * n + j]).collect(), v, norm2: 0.0 }
        })
        .collect();
    // Round-robin schedule over an even number of players (the one past `n`, if any, sits out).
    let players = n + n % 2;
    for _sweep in 0..JACOBI_MAX_SWEEPS {
        for c in &mut cols {
            c.norm2 = dot(&c.a, &c.a);
        }
        let mut rotated = false;
        for round in 0..players.saturating_sub(1) {
            let m = players - 1;
            let mut pairs = Vec::with_capacity(players / 2);
            let mut push = |x: usize, y: usize| {
                if x < n && y < n {
                    pairs.push((x.min(y), x.max(y)));
                }
            };
            push(m, round);
            for i in 1..players / 2 {
                push((round + i) % m, (round + m - i) % m);
            }
            let mut slots: Vec<Option<JacobiColumn>> = cols.drain(..).map(Some).collect();
            let mut work: Vec<(usize, usize, JacobiColumn, JacobiColumn)> = pairs
                .iter()
                .map(|&(p, q)| (p, q, slots[p].take().expect("disjoint"), slots[q].take().expect("disjoint")))
                .collect();
            let any = if n >= PARALLEL_JACOBI_MIN {
                work.par_iter_mut().map(|(_, _, x, y)| jacobi_rotate(x, y)).reduce(|| false, |a, b| a | b)
            } else {
                work.iter_mut().map(|(_, _, x, y)| jacobi_rotate(x, y)).fold(false, |a, b| a | b)
            };
            rotated |= any;
            for (p, q, x, y) in work {
                slots[p] = Some(x);
                slots[q] = Some(y);
            }
            cols = slots.into_iter().map(|c| c.expect("every column back")).collect();
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(f64, usize)> = cols.iter().enumerate().map(|(j, c)| (dot(&c.a, &c.a).sqrt(), j)).collect();
    order.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    let mut u = vec![0.0; n * n];
    let mut v = vec![0.0; n * n];
    let mut s = Vec::with_capacity(n);
    for (k, &(sigma, j)) in order.iter().enumerate() {
        s.push(sigma);
        for i in 0..n {
            if sigma > 0.0 {
                u[i * n + k] = cols[j].a[i] / sigma;
            }
            v[i * n + k] = cols[j].v[i];
        }
    }
    SmallSvd { u, s, v }
}

/// A column of `A V`, the matching column of `V`, and its squared norm.
struct JacobiColumn {
    a: Vec<f64>,
    v: Vec<f64>,
    norm2: f64,
}

/// Orthogonalises one pair of columns; whether it rotated.
fn jacobi_rotate(x: &mut JacobiColumn, y: &mut JacobiColumn) -> bool {
    let (alpha, beta) = (x.norm2, y.norm2);
    let gamma = dot(&x.a, &y.a);
    if gamma == 0.0 || gamma.abs() <= JACOBI_TOL * (alpha * beta).sqrt() {
        return false;
    }
    let zeta = (beta - alpha) / (2.0 * gamma);
    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
    let c = 1.0 / (1.0 + t * t).sqrt();
    let s = c * t;
    rotate(&mut x.a, &mut y.a, c, s);
    rotate(&mut x.v, &mut y.v, c, s);
    x.norm2 = alpha - t * gamma;
    y.norm2 = beta + t * gamma;
    true
}

fn rotate(x: &mut [f64], y: &mut [f64], c: f64, s: f64) {
    for (a, b) in x.iter_mut().zip(y.iter_mut()) {
        let (xa, yb) = (*a, *b);
        *a = c * xa - s * yb;
        *b = s * xa + c * yb;
    }
}

/// Cholesky factor `L` (lower, `n×n` row-major) of a symmetric positive definite `A = L Lᵀ`; `None` when
/// `A` is not positive definite to working precision.
pub(crate) fn cholesky(a: &[f64], n: usize) -> Option<Vec<f64>> {
    let max_diag = (0..n).map(|i| a[i * n + i]).fold(0.0f64, f64::max);
    if max_diag.is_nan() || max_diag <= 0.0 || !max_diag.is_finite() {
        return None;
    }
    let floor = CHOLESKY_RTOL * n as f64 * max_diag;
    let mut l = vec![0.0; n * n];
    for j in 0..n {
        let d = a[j * n + j] - dot(&l[j * n..j * n + j], &l[j * n..j * n + j]);
        if d.is_nan() || d <= floor {
            return None;
        }
        let djj = d.sqrt();
        l[j * n + j] = djj;
        for i in j + 1..n {
            let v = a[i * n + j] - dot(&l[i * n..i * n + j], &l[j * n..j * n + j]);
            l[i * n + j] = v / djj;
        }
    }
    Some(l)
}

/// Solves `L Lᵀ X = B` (`B` `n×p`) given the Cholesky factor `L`.
pub(crate) fn cholesky_solve(l: &[f64], b: &[f64], n: usize, p: usize) -> Vec<f64> {
    let mut x = b.to_vec();
    // Forward: L Y = B.
    for i in 0..n {
        for k in 0..i {
            let lik = l[i * n + k];
            if lik != 0.0 {
                for j in 0..p {
                    x[i * p + j] -= lik * x[k * p + j];
                }
            }
        }
        let d = l[i * n + i];
        for j in 0..p {
            x[i * p + j] /= d;
        }
    }
    // Backward: Lᵀ X = Y.
    for i in (0..n).rev() {
        for k in i + 1..n {
            let lki = l[k * n + i];
            if lki != 0.0 {
                for j in 0..p {
                    x[i * p + j] -= lki * x[k * p + j];
                }
            }
        }
        let d = l[i * n + i];
        for j in 0..p {
            x[i * p + j] /= d;
        }
    }
    x
}

/// `XᵀX` (`m×m`) and `XᵀY` (`m×p`) for the rows `X` (`n×m`) and `Y` (`n×p`) produced by `row(i)`: fixed
/// blocks of rows in parallel, their partial sums added in block order (bitwise identical across thread
/// counts; memory one partial sum per thread).
pub(crate) fn gram<F>(n: usize, m: usize, p: usize, row: F) -> (Vec<f64>, Vec<f64>)
where
    F: Fn(usize, &mut [f64], &mut [f64]) + Sync,
{
    let block = |b: usize| {
        let mut g = vec![0.0; m * m];
        let mut c = vec![0.0; m * p];
        let mut x = vec![0.0; m];
        let mut y = vec![0.0; p];
        for i in b * GRAM_BLOCK_ROWS..((b + 1) * GRAM_BLOCK_ROWS).min(n) {
            row(i, &mut x, &mut y);
            for (a, &xa) in x.iter().enumerate() {
                if xa == 0.0 {
                    continue;
                }
                for (g, &xb) in g[a * m + a..(a + 1) * m].iter_mut().zip(&x[a..]) {
                    *g += xa * xb;
                }
                for (c, &yb) in c[a * p..(a + 1) * p].iter_mut().zip(&y) {
                    *c += xa * yb;
                }
            }
        }
        (g, c)
    };
    let mut g = vec![0.0; m * m];
    let mut c = vec![0.0; m * p];
    // As many blocks at a time as there are threads (bounded memory), added in block order: the sum does
    // not depend on the grouping.
    let blocks = n.div_ceil(GRAM_BLOCK_ROWS);
    let group = rayon::current_num_threads().max(1);
    for first in (0..blocks).step_by(group) {
        let partial: Vec<(Vec<f64>, Vec<f64>)> =
            (first..(first + group).min(blocks)).into_par_iter().map(block).collect();
        for (bg, bc) in &partial {
            for (a, b) in g.iter_mut().zip(bg) {
                *a += b;
            }
            for (a, b) in c.iter_mut().zip(bc) {
                *a += b;
            }
        }
    }
    // Mirror the upper triangle.
    for a in 0..m {
        for b in 0..a {
            g[a * m + b] = g[b * m + a];
        }
    }
    (g, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    #[test]
    fn qr_reconstructs_and_is_orthonormal() {
        let mut seed = 1;
        let (n, k) = (9, 4);
        let a: Vec<f64> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let (q, r) = thin_qr(&a, n, k);
        assert!(max_abs_diff(&matmul(&q, &r, n, k, k), &a) < 1e-13);
        let qtq = matmul_tn(&q, &q, n, k, k);
        let eye: Vec<f64> = (0..k * k).map(|i| if i / k == i % k { 1.0 } else { 0.0 }).collect();
        assert!(max_abs_diff(&qtq, &eye) < 1e-14);
        for i in 0..k {
            for j in 0..i {
                assert_eq!(r[i * k + j], 0.0);
            }
        }
    }

    #[test]
    fn qr_of_dependent_and_wide_matrices() {
        // Column 2 = column 0 + column 1; and a 3×5 matrix (rank 3).
        let mut seed = 2;
        let n = 6;
        let mut a = vec![0.0; n * 3];
        for i in 0..n {
            a[i * 3] = lcg(&mut seed);
            a[i * 3 + 1] = lcg(&mut seed);
            a[i * 3 + 2] = a[i * 3] + a[i * 3 + 1];
        }
        let (q, r) = thin_qr(&a, n, 3);
        assert!(max_abs_diff(&matmul(&q, &r, n, 3, 3), &a) < 1e-13);
        assert_eq!(r[2 * 3 + 2], 0.0);
        let w: Vec<f64> = (0..15).map(|_| lcg(&mut seed)).collect();
        let (q, r) = thin_qr(&w, 3, 5);
        assert!(max_abs_diff(&matmul(&q, &r, 3, 5, 5), &w) < 1e-13);
    }

    #[test]
    fn jacobi_svd_reconstructs() {
        let mut seed = 3;
        let n = 7;
        let a: Vec<f64> = (0..n * n).map(|_| lcg(&mut seed)).collect();
        let SmallSvd { u, s, v } = jacobi_svd(&a, n);
        assert!(s.windows(2).all(|w| w[0] >= w[1]));
        let mut us = u.clone();
        for i in 0..n {
            for j in 0..n {
                us[i * n + j] *= s[j];
            }
        }
        assert!(max_abs_diff(&matmul(&us, &transpose(&v, n, n), n, n, n), &a) < 1e-13);
        let utu = matmul_tn(&u, &u, n, n, n);
        let vtv = matmul_tn(&v, &v, n, n, n);
        let eye: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
        assert!(max_abs_diff(&utu, &eye) < 1e-13);
        assert!(max_abs_diff(&vtv, &eye) < 1e-13);
    }

    #[test]
    fn parallel_jacobi_is_thread_independent_and_accurate() {
        let mut seed = 6;
        let n = 81; // odd, above the parallel threshold
        let a: Vec<f64> = (0..n * n).map(|_| lcg(&mut seed)).collect();
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| jacobi_svd(&a, n));
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| jacobi_svd(&a, n));
        assert_eq!(one.s, three.s);
        assert_eq!(one.v, three.v);
        let mut us = one.u.clone();
        for i in 0..n {
            for j in 0..n {
                us[i * n + j] *= one.s[j];
            }
        }
        assert!(max_abs_diff(&matmul(&us, &transpose(&one.v, n, n), n, n, n), &a) < 1e-12);
    }

    #[test]
    fn cholesky_solves_and_refuses_singular() {
        let mut seed = 4;
        let n = 5;
        let x: Vec<f64> = (0..8 * n).map(|_| lcg(&mut seed)).collect();
        let a = matmul_tn(&x, &x, 8, n, n);
        let b: Vec<f64> = (0..n * 2).map(|_| lcg(&mut seed)).collect();
        let l = cholesky(&a, n).unwrap();
        let sol = cholesky_solve(&l, &b, n, 2);
        assert!(max_abs_diff(&matmul(&a, &sol, n, n, 2), &b) < 1e-12);
        // Rank 3 < 5.
        let a = matmul_tn(&x[..3 * n], &x[..3 * n], 3, n, n);
        assert!(cholesky(&a, n).is_none());
    }

    #[test]
    fn gram_matches_direct_products() {
        let mut seed = 5;
        let (n, m, p) = (600, 4, 3);
        let x: Vec<f64> = (0..n * m).map(|_| lcg(&mut seed)).collect();
        let y: Vec<f64> = (0..n * p).map(|_| lcg(&mut seed)).collect();
        let (g, c) = gram(n, m, p, |i, xr, yr| {
            xr.copy_from_slice(&x[i * m..(i + 1) * m]);
            yr.copy_from_slice(&y[i * p..(i + 1) * p]);
        });
        assert!(max_abs_diff(&g, &matmul_tn(&x, &x, n, m, m)) < 1e-11);
        assert!(max_abs_diff(&c, &matmul_tn(&x, &y, n, m, p)) < 1e-11);
        let fill = |i: usize, xr: &mut [f64], yr: &mut [f64]| {
            xr.copy_from_slice(&x[i * m..(i + 1) * m]);
            yr.copy_from_slice(&y[i * p..(i + 1) * p]);
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| gram(n, m, p, fill));
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| gram(n, m, p, fill));
        assert_eq!(one, three);
        assert_eq!(one, (g, c));
    }
}
