//! Forward and backward of every operation of the GPT-NeoX trainer, on packed row-major buffers
//! (`rows × width`, the rows of several sequences end to end, as the runtime lays them out).
//!
//! Forwards compute exactly what the CPU runtime ([`crate::cpu`]) computes (same formulas, same kernels, the
//! runtime's own attention). Backwards write input gradients (overwriting) and accumulate parameter
//! gradients (`+=`). Every reduction over rows (bias, layer-norm and weight gradients) runs over a
//! fixed partition of the rows and adds the partial results in a fixed order, and the kernels' GEMMs
//! give each element the same `k`-ordered sum whatever the split, so results do not depend on the
//! number of threads.

use memsteer_kernels::{Device, MatMut, MatRef, matmul, matmul_strided, matmul_transposed, vmath};
use rayon::prelude::*;

use crate::Result;
use crate::arch::{Arch, ScoreMap, WeightLayout};
use crate::config::Activation;
use crate::ops::{Heads, Layout};

/// Rows per parallel task of the row-wise operations (fixed: it defines the reduction order).
const ROW_BLOCK: usize = 32;
/// Tasks of a weight gradient `dW += dYᵀ X` (each packs all of `X`, so few and large; the split
/// depends on the shapes only).
const WEIGHT_TASKS: usize = 8;

pub(crate) use crate::ops::layer_norm_stats as layer_norm_forward;

/// Sums `f(block)` over fixed blocks of `ROW_BLOCK` rows, each giving `width` partial sums, and adds
/// the partials to `acc` in block order.
fn blocked_sum(rows: usize, width: usize, acc: &mut [f32], f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) {
    let blocks = rows.div_ceil(ROW_BLOCK);
    let partials: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|blk| {
            let mut p = vec![0.0f32; width];
            f(blk * ROW_BLOCK..((blk + 1) * ROW_BLOCK).min(rows), &mut p);
            p
        })
        .collect();
    for p in partials {
        acc.iter_mut().zip(&p).for_each(|(a, v)| *a += v);
    }
}

/// Backward of [`layer_norm_forward`]: `dx += ∂/∂x`, `dg += Σ dout·x̂`, `db += Σ dout`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_backward(
    dout: &[f32],
    x: &[f32],
    (mean, rstd): (&[f32], &[f32]),
    g: &[f32],
    dx: &mut [f32],
    dg: &mut [f32],
    db: &mut [f32],
) {
    let d = g.len();
    let rows = mean.len();
    dx.par_chunks_mut(ROW_BLOCK * d).enumerate().for_each(|(blk, dx)| {
        for (i, dxr) in dx.chunks_exact_mut(d).enumerate() {
            let r = blk * ROW_BLOCK + i;
            let (xr, dr) = (&x[r * d..(r + 1) * d], &dout[r * d..(r + 1) * d]);
            let (mu, inv) = (mean[r], rstd[r]);
            let (mut m1, mut m2) = (0.0f32, 0.0f32);
            for j in 0..d {
                let dn = dr[j] * g[j];
                m1 += dn;
                m2 += dn * (xr[j] - mu) * inv;
            }
            m1 /= d as f32;
            m2 /= d as f32;
            for j in 0..d {
                let xhat = (xr[j] - mu) * inv;
                dxr[j] += inv * (dr[j] * g[j] - m1 - xhat * m2);
            }
        }
    });
    let mut both = vec![0.0f32; 2 * d];
    blocked_sum(rows, 2 * d, &mut both, |range, p| {
        for r in range {
            let (xr, dr) = (&x[r * d..(r + 1) * d], &dout[r * d..(r + 1) * d]);
            for j in 0..d {
                p[j] += dr[j] * (xr[j] - mean[r]) * rstd[r];
                p[d + j] += dr[j];
            }
        }
    });
    dg.iter_mut().zip(&both[..d]).for_each(|(a, v)| *a += v);
    db.iter_mut().zip(&both[d..]).for_each(|(a, v)| *a += v);
}

/// `y = x Wᵀ + b` with `W` stored `out × in` (PyTorch `Linear`), or `y = x W + b` with `W` stored
/// `in × out` (GPT-2's `Conv1D`): the runtime's products (the trainer's backend adds optional biases
/// itself; the gradient checks use this).
#[cfg(test)]
pub(crate) fn linear_forward(
    x: &[f32],
    (w, b, layout): (&[f32], &[f32], WeightLayout),
    rows: usize,
    din: usize,
    y: &mut [f32],
) -> Result<()> {
    crate::ops::linear(x, w, layout, (rows, din, b.len()), y)?;
    crate::ops::bias_act(y, b, None);
    Ok(())
}

/// `dw += dyᵀ x` (`dy`: `rows × out`, `x`: `rows × in`, `dw`: `out × in`), split over blocks of output
/// rows fixed by the shapes.
pub(crate) fn weight_grad(dy: &[f32], x: &[f32], rows: usize, din: usize, dw: &mut [f32]) -> Result<()> {
    let dout = dw.len() / din;
    let block = dout.div_ceil(WEIGHT_TASKS).max(16);
    dw.par_chunks_mut(block * din).enumerate().try_for_each(|(blk, dw)| {
        let o0 = blk * block;
        let block_rows = dw.len() / din;
        matmul_strided(
            &Device::Cpu,
            (block_rows, rows, din),
            MatRef { data: &dy[o0..], rs: 1, cs: dout },
            MatRef::row_major(x, din),
            1.0,
            MatMut::row_major(dw, din),
        )
    })?;
    Ok(())
}

/// `db += Σ_rows dy`.
pub(crate) fn bias_grad(dy: &[f32], db: &mut [f32]) {
    let w = db.len();
    let rows = dy.len() / w;
    blocked_sum(rows, w, db, |range, p| {
        for r in range {
            p.iter_mut().zip(&dy[r * w..(r + 1) * w]).for_each(|(a, v)| *a += v);
        }
    });
}

/// Backward of [`linear_forward`]: `dx = dy W` (or `dy Wᵀ` for `in × out` storage; overwritten, when
/// asked), `dw += dyᵀ x` (or `xᵀ dy`), `db += Σ dy` (when the layer has a bias).
pub(crate) fn linear_backward(
    dy: &[f32],
    x: &[f32],
    (w, layout): (&[f32], WeightLayout),
    rows: usize,
    dx: Option<&mut [f32]>,
    (dw, db): (&mut [f32], Option<&mut [f32]>),
) -> Result<()> {
    let dout = dy.len() / rows.max(1);
    let din = w.len() / dout.max(1);
    match layout {
        WeightLayout::OutputsMajor => {
            if let Some(dx) = dx {
                matmul(&Device::Cpu, dy, w, rows, dout, din, dx)?;
            }
            weight_grad(dy, x, rows, din, dw)?;
        }
        WeightLayout::InputsMajor => {
            if let Some(dx) = dx {
                matmul_transposed(&Device::Cpu, dy, w, rows, dout, din, dx)?;
            }
            // `dw` is `in × out`: the same product with the roles of `x` and `dy` exchanged.
            weight_grad(x, dy, rows, dout, dw)?;
        }
    }
    if let Some(db) = db {
        bias_grad(dy, db);
    }
    Ok(())
}

/// RMSNorm of every row, `out = x·rstd·g`, keeping `rstd` for the backward (the runtime's formulas).
pub(crate) fn rms_norm_forward(x: &[f32], g: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let d = g.len();
    out.par_chunks_mut(ROW_BLOCK * d).zip(x.par_chunks(ROW_BLOCK * d)).zip(rstd.par_chunks_mut(ROW_BLOCK)).for_each(
        |((out, x), rstd)| {
            for ((row, o), r) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(rstd) {
                *r = memsteer_kernels::vmath::rms_norm_row(row, g, eps, o);
            }
        },
    );
}

/// Backward of [`rms_norm_forward`] (rows of `g.len()` values): `dx += rstd·(u − x·rstd²·mean(u·x))`
/// with `u = dout·g`, `dg += Σ dout·x·rstd`.
pub(crate) fn rms_norm_backward(dout: &[f32], x: &[f32], rstd: &[f32], g: &[f32], dx: &mut [f32], dg: &mut [f32]) {
    let d = g.len();
    let rows = rstd.len();
    dx.par_chunks_mut(ROW_BLOCK * d).enumerate().for_each(|(blk, dx)| {
        for (i, dxr) in dx.chunks_exact_mut(d).enumerate() {
            let r = blk * ROW_BLOCK + i;
            let (xr, dr, inv) = (&x[r * d..(r + 1) * d], &dout[r * d..(r + 1) * d], rstd[r]);
            let m: f32 = (0..d).map(|j| dr[j] * g[j] * xr[j]).sum::<f32>() / d as f32;
            for j in 0..d {
                dxr[j] += inv * (dr[j] * g[j] - xr[j] * inv * inv * m);
            }
        }
    });
    let mut acc = vec![0.0f32; d];
    blocked_sum(rows, d, &mut acc, |range, p| {
        for r in range {
            let (xr, dr) = (&x[r * d..(r + 1) * d], &dout[r * d..(r + 1) * d]);
            for j in 0..d {
                p[j] += dr[j] * xr[j] * rstd[r];
            }
        }
    });
    dg.iter_mut().zip(&acc).for_each(|(a, v)| *a += v);
}

/// The positions, in the fused rows, of row `row`'s q (`q == true`) or k values, heads in order (so that
/// consecutive groups of a norm's width are one head, or all heads at once).
fn qk_columns(arch: &Arch, q: bool) -> impl Fn(usize) -> Vec<usize> {
    let (off, hd) = (arch.qkv_offsets(), arch.head_dim);
    let (base, heads) = if q { (off.q, arch.heads) } else { (off.k, arch.kv_heads) };
    move |row| {
        (0..heads * hd)
            .map(|c| {
                let (h, i) = (c / hd, c % hd);
                row * off.row + base + h * off.head + i
            })
            .collect()
    }
}

/// The q/k norms of the runtime ([`crate::ops::qk_rms_norm`]) on the fused rows, in place, keeping the
/// normed inputs (`pre`, a copy of `qkv` before) and each group's `rstd` for the backward.
pub(crate) fn qk_norm_forward(
    qkv: &mut [f32],
    arch: &Arch,
    (qn, kn): (&[f32], &[f32]),
    rows: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let pre = qkv.to_vec();
    let mut stats = [Vec::new(), Vec::new()];
    for (k, (q, g)) in [(true, qn), (false, kn)].into_iter().enumerate() {
        let cols = qk_columns(arch, q);
        let mut x: Vec<f32> = (0..rows).flat_map(|r| cols(r).into_iter().map(|c| pre[c])).collect();
        let mut rstd = vec![0.0f32; x.len() / g.len()];
        let mut out = vec![0.0f32; x.len()];
        rms_norm_forward(&x, g, arch.norm_eps(), &mut out, &mut rstd);
        x.clear();
        for (r, chunk) in out.chunks(out.len() / rows.max(1)).enumerate() {
            for (c, v) in cols(r).into_iter().zip(chunk) {
                qkv[c] = *v;
            }
        }
        stats[k] = rstd;
    }
    let [q, k] = stats;
    (pre, q, k)
}

/// Backward of [`qk_norm_forward`]: `dqkv` holds gradients with respect to the normed q and k (and
/// v); afterwards, with respect to the projection's output. Accumulates the norm weights' gradients.
pub(crate) fn qk_norm_backward(
    dqkv: &mut [f32],
    (pre, q_rstd, k_rstd): (&[f32], &[f32], &[f32]),
    arch: &Arch,
    (qn, kn): (&[f32], &[f32]),
    (dqn, dkn): (&mut [f32], &mut [f32]),
    rows: usize,
) {
    for (q, g, rstd, dg) in [(true, qn, q_rstd, dqn), (false, kn, k_rstd, dkn)] {
        let cols = qk_columns(arch, q);
        let gather =
            |buf: &[f32]| -> Vec<f32> { (0..rows).flat_map(|r| cols(r).into_iter().map(|c| buf[c])).collect() };
        let (x, dout) = (gather(pre), gather(dqkv));
        let mut dx = vec![0.0f32; x.len()];
        rms_norm_backward(&dout, &x, rstd, g, &mut dx, dg);
        for (r, chunk) in dx.chunks(dx.len() / rows.max(1)).enumerate() {
            for (c, v) in cols(r).into_iter().zip(chunk) {
                dqkv[c] = *v;
            }
        }
    }
}

/// `mid = gelu_tanh(gate) · up` (GeGLU), elementwise, as the runtime computes it.
pub(crate) fn geglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let (mut g, mut mid) = (gate.to_vec(), up.to_vec());
    crate::ops::gelu_tanh_mul(&mut g, &mut mid);
    mid
}

/// Backward of [`geglu_forward`]: `dgate = dmid·up·gelu'(gate)`, `dup = dmid·gelu(gate)`.
pub(crate) fn geglu_backward(dmid: &[f32], gate: &[f32], up: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut act = vec![0.0f32; gate.len()];
    gelu_forward(gate, Activation::GeluTanh, &mut act);
    let dup: Vec<f32> = dmid.iter().zip(&act).map(|(d, a)| d * a).collect();
    let dgate: Vec<f32> =
        dmid.iter().zip(up).zip(gate).map(|((d, u), &g)| d * u * gelu_derivative(g, Activation::GeluTanh)).collect();
    (dgate, dup)
}

/// `mid = silu(gate) · up` (SwiGLU), elementwise, as the runtime computes it.
pub(crate) fn swiglu_forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut mid = up.to_vec();
    crate::ops::silu_mul(gate, &mut mid);
    mid
}

/// Backward of [`swiglu_forward`]: from `dmid`, `dgate = dmid·up·silu'(gate)` and `dup = dmid·silu(gate)`
/// (`silu'(g) = σ(g)(1 + g(1 − σ(g)))`).
pub(crate) fn swiglu_backward(dmid: &[f32], gate: &[f32], up: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dgate = vec![0.0f32; dmid.len()];
    let mut dup = vec![0.0f32; dmid.len()];
    const CHUNK: usize = 1 << 14;
    dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
        let at = c * CHUNK;
        for i in 0..dg.len() {
            let (g, u, d) = (gate[at + i], up[at + i], dmid[at + i]);
            let sig = 1.0 / (1.0 + vmath::exp(-g));
            du[i] = d * g * sig;
            dg[i] = d * u * sig * (1.0 + g * (1.0 - sig));
        }
    });
    (dgate, dup)
}

/// `post = gelu(pre)` with the runtime's vectorised GELU.
pub(crate) fn gelu_forward(pre: &[f32], act: Activation, post: &mut [f32]) {
    post.par_chunks_mut(1 << 14).zip(pre.par_chunks(1 << 14)).for_each(|(o, i)| {
        o.copy_from_slice(i);
        match act {
            Activation::GeluExact => vmath::gelu_erf_in_place(o),
            Activation::GeluTanh => vmath::gelu_tanh_in_place(o),
        }
    });
}

/// `d gelu / dx` at `x`, in `f32` with the vectorisable `exp` of the forward. Exact GELU:
/// `Φ(x) + x φ(x)`, with `Φ` from the forward's erfc approximation (Abramowitz–Stegun 7.1.26, absolute
/// error below 1.5e-7) sharing its `exp(−x²/2)` with `φ`. Tanh GELU: `½(1 + tanh u) + ½x(1 − tanh²u) u'`.
#[inline(always)]
pub(crate) fn gelu_derivative(x: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluExact => {
            let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
            let t = 1.0 / (1.0 + 0.327_591_1 * z);
            let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6) * t;
            let e = vmath::exp(-z * z);
            let erfc = poly * e;
            let cdf = 0.5 * if x >= 0.0 { 2.0 - erfc } else { erfc };
            // 1/√(2π)
            cdf + x * e * 0.398_942_3
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // √(2/π)
            let u = C * (x + 0.044_715 * x * x * x);
            let th = 2.0 / (1.0 + vmath::exp(-2.0 * u)) - 1.0;
            0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * C * (1.0 + 3.0 * 0.044_715 * x * x)
        }
    }
}

/// Backward of [`gelu_forward`] in place: `d ← d · gelu'(pre)`.
pub(crate) fn gelu_backward(d: &mut [f32], pre: &[f32], act: Activation) {
    d.par_chunks_mut(1 << 14).zip(pre.par_chunks(1 << 14)).for_each(|(d, p)| {
        d.iter_mut().zip(p).for_each(|(d, &x)| *d *= gelu_derivative(x, act));
    });
}

/// The rotary tables of positions `0..positions` and the fused QKV layout, from the architecture.
#[derive(Debug, Clone)]
pub(crate) struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    off: crate::arch::QkvOffsets,
    heads: (usize, usize),
    half: usize,
}

impl Rotary {
    /// The runtime's tables ([`crate::arch::Arch::rotary_table`]).
    pub fn new(arch: &crate::arch::Arch, positions: usize) -> Self {
        let (cos, sin) = arch.rotary_table((0, positions));
        Self { cos, sin, off: arch.qkv_offsets(), heads: (arch.heads, arch.kv_heads), half: arch.rotary_dims() / 2 }
    }

    /// The sliding layers' own tables, when they have them ([`crate::arch::Arch::local_rotary_table`]).
    pub fn local(arch: &crate::arch::Arch, positions: usize) -> Option<Self> {
        let (cos, sin) = arch.local_rotary_table((0, positions))?;
        Some(Self {
            cos,
            sin,
            off: arch.qkv_offsets(),
            heads: (arch.heads, arch.kv_heads),
            half: arch.rotary_dims() / 2,
        })
    }

    /// Rotates every q and k head in place ([`crate::ops::rotate`]); `inverse` applies the transposed
    /// rotation (the backward of the forward rotation).
    pub fn apply(&self, qkv: &mut [f32], positions: &[usize], inverse: bool) {
        crate::ops::rotate(qkv, (self.off, self.heads, self.half), (&self.cos, &self.sin), positions, inverse);
    }
}

/// Causal attention of the fused, rotated `qkv` (laid out as `arch` says), through the runtime's own
/// kernel.
pub(crate) fn attention_forward(
    qkv: &[f32],
    layout: &Layout,
    arch: &Arch,
    scores: ScoreMap,
    ctx: &mut [f32],
) -> Result<()> {
    let off = arch.qkv_offsets();
    let fused = |base| Heads { data: qkv, row_stride: off.row, base, head_stride: off.head };
    let shape = (arch.heads, arch.heads / arch.kv_heads, arch.head_dim);
    let kv = |s: usize| (fused(off.k), fused(off.v), layout.starts[s]);
    crate::ops::attention(fused(off.q), &kv, layout, shape, scores, ctx)
}

/// Backward of [`attention_forward`]: `dqkv` (overwritten, laid out as `qkv`, gradients with respect
/// to the rotated q, k and v) from `dctx` (`rows × heads·hd`). One task per (sequence, query head); the
/// probabilities are recomputed rather than stored. With grouped-query attention the key and value
/// gradients of the query heads sharing a key/value head are added in head order.
pub(crate) fn attention_backward(
    dctx: &[f32],
    qkv: &[f32],
    layout: &Layout,
    (arch, scores): (&Arch, ScoreMap),
    dqkv: &mut [f32],
) -> Result<()> {
    let (heads, hd, off) = (arch.heads, arch.head_dim, arch.qkv_offsets());
    let group = heads / arch.kv_heads;
    let a = heads * hd;
    let scale = scores.scale;
    let dev = Device::Cpu;
    // Head-major scratch: sequence s's region holds its query heads one after another, each `len` rows
    // of [dq, dk, dv] (hd each).
    let rows = layout.rows();
    let mut scratch = vec![0.0f32; rows * 3 * a];
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::with_capacity(layout.starts.len() * heads);
    let mut rest = scratch.as_mut_slice();
    for s in 0..layout.starts.len() - 1 {
        let len = layout.starts[s + 1] - layout.starts[s];
        let (region, tail) = rest.split_at_mut(len * 3 * a);
        rest = tail;
        for (h, chunk) in region.chunks_exact_mut(len * 3 * hd).enumerate() {
            tasks.push((s, h, chunk));
        }
    }
    tasks.into_par_iter().try_for_each(|(s, h, out)| -> Result<()> {
        let (start, len) = (layout.starts[s], layout.starts[s + 1] - layout.starts[s]);
        let head =
            |part: usize, h: usize| MatRef { data: &qkv[start * off.row + part + h * off.head..], rs: off.row, cs: 1 };
        let (q, k, v) = (head(off.q, h), head(off.k, h / group), head(off.v, h / group));
        let dout = MatRef { data: &dctx[start * a + h * hd..], rs: a, cs: 1 };
        let mut p = vec![0.0f32; len * len];
        // The soft-cap's slope at each score (1 without a cap).
        let mut slope = vec![0.0f32; len * len];
        matmul_strided(&dev, (len, hd, len), q, k.t(), 0.0, MatMut::row_major(&mut p, len))?;
        for (r, (row, sl)) in p.chunks_exact_mut(len).zip(slope.chunks_exact_mut(len)).enumerate() {
            scores.weights(row, r, Some(sl));
        }
        let mut ds = vec![0.0f32; len * len];
        matmul_strided(&dev, (len, hd, len), dout, v.t(), 0.0, MatMut::row_major(&mut ds, len))?;
        // dV = Pᵀ dO
        matmul_strided(
            &dev,
            (len, len, hd),
            MatRef::row_major(&p, len).t(),
            dout,
            0.0,
            MatMut { data: &mut out[2 * hd..], rs: 3 * hd, cs: 1 },
        )?;
        // dS = P ⊙ (dP − rowsum(P ⊙ dP)) ⊙ slope · scale, zero outside the visible keys.
        for r in 0..len {
            let first = scores.first_key(r);
            let (pr, dr) = (&p[r * len..(r + 1) * len], &mut ds[r * len..(r + 1) * len]);
            let sl = &slope[r * len..(r + 1) * len];
            let dot: f32 = pr[first..=r].iter().zip(&dr[first..=r]).map(|(a, b)| a * b).sum();
            for j in first..=r {
                dr[j] = pr[j] * (dr[j] - dot) * sl[j] * scale;
            }
            dr[..first].fill(0.0);
            dr[r + 1..].fill(0.0);
        }
        // dQ = dS K, dK = dSᵀ Q.
        matmul_strided(
            &dev,
            (len, len, hd),
            MatRef::row_major(&ds, len),
            k,
            0.0,
            MatMut { data: &mut out[..], rs: 3 * hd, cs: 1 },
        )?;
        matmul_strided(
            &dev,
            (len, len, hd),
            MatRef::row_major(&ds, len).t(),
            q,
            0.0,
            MatMut { data: &mut out[hd..], rs: 3 * hd, cs: 1 },
        )?;
        Ok(())
    })?;
    // Back to the fused layout: dq to each query head; dk and dv summed over each group, in head order.
    dqkv.par_chunks_mut(off.row).enumerate().for_each(|(row, o)| {
        let s = layout.starts.partition_point(|&st| st <= row) - 1;
        let (start, len) = (layout.starts[s], layout.starts[s + 1] - layout.starts[s]);
        let i = row - start;
        for h in 0..heads {
            let src = start * 3 * a + h * len * 3 * hd + i * 3 * hd;
            let at = off.q + h * off.head;
            o[at..at + hd].copy_from_slice(&scratch[src..src + hd]);
            for (p, base) in [(1, off.k), (2, off.v)] {
                let (at, g) = (base + (h / group) * off.head, &scratch[src + p * hd..src + (p + 1) * hd]);
                if h % group == 0 {
                    o[at..at + hd].copy_from_slice(g);
                } else {
                    o[at..at + hd].iter_mut().zip(g).for_each(|(o, g)| *o += g);
                }
            }
        }
    });
    Ok(())
}

/// The output layer and mean cross-entropy over the predicted rows (every row but each sequence's
/// last). Returns each predicted row's `log p(target)`; with `grads`, writes `dhidden` (overwritten,
/// zero on unpredicted rows) and accumulates `dw += ∂loss/∂W` for `loss = −mean log p`. With
/// `softcap = Some(c)` the logits are `c·tanh(z/c)` of the products `z`.
pub(crate) fn output_layer(
    hidden: &[f32],
    w: &[f32],
    layout: &Layout,
    tokens: &[u32],
    (d, softcap): (usize, Option<f32>),
    grads: Option<(&mut [f32], &mut [f32])>,
) -> Result<Vec<f32>> {
    let vocab = w.len() / d;
    let seqs = layout.starts.len() - 1;
    let predicted: Vec<usize> =
        (0..seqs).flat_map(|s| layout.starts[s]..layout.starts[s + 1].saturating_sub(1)).collect();
    let p = predicted.len();
    let mut h = vec![0.0f32; p * d];
    h.par_chunks_mut(d).zip(&predicted).for_each(|(o, &r)| o.copy_from_slice(&hidden[r * d..(r + 1) * d]));
    let mut logits = vec![0.0f32; p * vocab];
    matmul_transposed(&Device::Cpu, &h, w, p, d, vocab, &mut logits)?;
    let want_grad = grads.is_some();
    let inv_p = 1.0 / p as f32;
    let mut logp = vec![0.0f32; p];
    logits.par_chunks_mut(vocab).zip(&mut logp).zip(&predicted).for_each(|((row, lp), &r)| {
        let t = tokens[r + 1] as usize;
        if let Some(cap) = softcap {
            vmath::softcap_in_place(row, cap);
        }
        let m = vmath::max(row);
        let lse = m + vmath::sum_exp(row, m).ln();
        *lp = row[t] - lse;
        if want_grad {
            match softcap {
                None => {
                    row.iter_mut().for_each(|x| *x = vmath::exp(*x - lse) * inv_p);
                    row[t] -= inv_p;
                }
                // Through the cap: ∂c/∂z = 1 − (c/cap)².
                Some(cap) => {
                    for (j, x) in row.iter_mut().enumerate() {
                        let (c, hit) = (*x, if j == t { inv_p } else { 0.0 });
                        let slope = (1.0 - (c / cap) * (c / cap)).max(0.0);
                        *x = (vmath::exp(c - lse) * inv_p - hit) * slope;
                    }
                }
            }
        }
    });
    if let Some((dhidden, dw)) = grads {
        let mut dh = vec![0.0f32; p * d];
        matmul(&Device::Cpu, &logits, w, p, vocab, d, &mut dh)?;
        dhidden.fill(0.0);
        for (i, &r) in predicted.iter().enumerate() {
            dhidden[r * d..(r + 1) * d].copy_from_slice(&dh[i * d..(i + 1) * d]);
        }
        weight_grad(&logits, &h, p, d, dw)?;
    }
    Ok(logp)
}
