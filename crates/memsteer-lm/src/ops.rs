//! Small per-element and per-row operations shared by the architectures.

use crate::config::Activation;

pub(crate) fn layer_norm(x: &mut [f32], (g, b): &(Vec<f32>, Vec<f32>), eps: f32, out: &mut [f32]) {
    let d = g.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            o[i] = (row[i] - mean) * inv * g[i] + b[i];
        }
    }
}

pub(crate) fn gelu(x: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluTanh => 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh()),
        Activation::GeluExact => 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)),
    }
}

/// erf with |error| < 1.5e-7 (Abramowitz–Stegun 7.1.26), computed in f64.
fn erf(x: f32) -> f32 {
    let x = f64::from(x);
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let y = 1.0
        - (((((1.061_405_429 * t - 1.453_152_027) * t) + 1.421_413_741) * t - 0.284_496_736) * t + 0.254_829_592)
            * t
            * (-x * x).exp();
    (y.copysign(x)) as f32
}

pub(crate) fn add_bias(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        for (v, bi) in row.iter_mut().zip(b) {
            *v += bi;
        }
    }
}

/// Causal multi-head attention: `q`, `k`, `v` are `t × d` with head `h` in columns `h·hd .. (h+1)·hd`;
/// writes `softmax(q kᵀ / √hd + causal mask) v` per head into `out` (`t × d`).
pub(crate) fn causal_attention(q: &[f32], k: &[f32], v: &[f32], t: usize, d: usize, heads: usize, out: &mut [f32]) {
    let hd = d / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0.0f32; t];
    for head in 0..heads {
        let off = head * hd;
        for i in 0..t {
            let qi = &q[i * d + off..i * d + off + hd];
            let mut max = f32::NEG_INFINITY;
            for j in 0..=i {
                let kj = &k[j * d + off..j * d + off + hd];
                let s = qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f32>() * scale;
                scores[j] = s;
                max = max.max(s);
            }
            let mut z = 0.0;
            for s in &mut scores[..=i] {
                *s = (*s - max).exp();
                z += *s;
            }
            let o = &mut out[i * d + off..i * d + off + hd];
            o.fill(0.0);
            for j in 0..=i {
                let w = scores[j] / z;
                for (oo, vv) in o.iter_mut().zip(&v[j * d + off..j * d + off + hd]) {
                    *oo += w * vv;
                }
            }
        }
    }
}
