//! Elementwise `f32` math written so the compiler vectorises it (no calls into libm in the loops):
//! `exp`, softmax, log-sum-exp pieces, both GELU variants and the rows of layer norm and RMSNorm.
//! Accuracy is checked against `f64` in this module's tests: `exp` within 2e-7 relative over its
//! range, GELU within 3e-7 absolute plus 1e-6 relative, the norms within 1e-5 relative.
//!
//! The loops are compiled three times (AVX-512, AVX2 + FMA, the baseline) and the widest the CPU has
//! runs. The three compute the same IEEE operations in the same order (Rust never fuses a multiply
//! and an add by itself, and the explicit accumulators fix the order of every sum), so their results
//! are bitwise identical: only the speed differs (tested on this CPU's versions).

/// Defines `pub fn $name` whose body is compiled for AVX-512, AVX2 + FMA and the baseline, and runs
/// the widest version the CPU supports.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[allow(unsafe_code)]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                let cap = version_cap();
                if cap == Version::Baseline {
                    return body($($arg),*);
                }
                if cap == Version::Widest
                    && std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the features were just detected.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// The widest version [`multiversion!`] may run (tests compare the versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // only tests cap it
enum Version {
    Widest,
    Avx2,
    Baseline,
}

#[cfg(test)]
thread_local! {
    static VERSION_CAP: std::cell::Cell<Version> = const { std::cell::Cell::new(Version::Widest) };
}

#[inline(always)]
#[allow(dead_code)] // unused off x86-64
fn version_cap() -> Version {
    #[cfg(test)]
    {
        VERSION_CAP.with(std::cell::Cell::get)
    }
    #[cfg(not(test))]
    {
        Version::Widest
    }
}

/// Lanes of the explicit accumulators (one AVX-512 register of `f32`; two AVX, four SSE registers).
/// Sixteen rather than eight doubled the AVX-512 version's speed on the output layer's log-sum-exp.
const LANES: usize = 16;

/// `eˣ` to about one ulp (Cephes' polynomial after range reduction by ln 2). Returns 0 below −87
/// (where `f32` results are subnormal) and saturates at `e⁸⁸`. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let fx = xc * LOG2E + MAGIC;
    let n = fx - MAGIC;
    let i = fx.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    // r = x − n ln 2 in two parts (ln 2 = 0.693359375 − 2.12194440e-4).
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    let scaled = y * f32::from_bits(((i + 127) as u32) << 23);
    if x < -87.0 { 0.0 } else { scaled }
}

/// `tanh x` within 2.5e-7 relative (1.6e-7 the worst of a sweep of every 61st float in the tests): the odd Taylor polynomial to
/// `x¹⁷` below `|x| = 0.55` (it leaves out 5e-9 relative there), `1 − 2/(e^{2|x|} + 1)` with the sign
/// of `x` above (where `2/(e^{2|x|} + 1) < 0.5`, so the subtraction loses at most a bit), ±1 where
/// `e^{2|x|}` saturates. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let big = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    let x2 = x * x;
    let p = TANH_TAYLOR.iter().rev().fold(0.0f32, |acc, &c| acc * x2 + c);
    let small = x + x * x2 * p;
    (if a < TANH_SWITCH { small } else { big }).copysign(x)
}

/// Below this `|x|`, [`tanh`] is its Taylor polynomial.
const TANH_SWITCH: f32 = 0.55;
/// The Taylor coefficients of `tanh` after `x`: of `x³, x⁵, …, x¹⁷` (`2²ⁿ(2²ⁿ − 1) B₂ₙ / (2n)!`).
const TANH_TAYLOR: [f32; 8] = [
    -1.0 / 3.0,
    2.0 / 15.0,
    -17.0 / 315.0,
    62.0 / 2835.0,
    -1382.0 / 155_925.0,
    21844.0 / 6_081_075.0,
    -929_569.0 / 638_512_875.0,
    6_404_582.0 / 10_854_718_875.0,
];

/// `Σ f(x)` over `xs` in [`LANES`] running sums (added up in lane order at the end) and then the
/// remainder: the same order in every version.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    let mut s = 0.0f32;
    for &x in rest {
        s += f(x);
    }
    acc.iter().sum::<f32>() + s
}

multiversion! {
/// Layer norm of one row, `out = (x − mean)·rstd·g + b` with `rstd = 1/√(var + eps)` (biased
/// variance, two passes); returns `(mean, rstd)`. `g`, `b` and `out` have `x`'s length.
pub fn layer_norm_row(x: &[f32], g: &[f32], b: &[f32], eps: f32, out: &mut [f32]) -> (f32, f32) {
    debug_assert!(g.len() == x.len() && b.len() == x.len() && out.len() == x.len());
    let d = x.len() as f32;
    let mu = lane_sum(x, |v| v) / d;
    let var = lane_sum(x, |v| (v - mu) * (v - mu)) / d;
    let inv = 1.0 / (var + eps).sqrt();
    for (((o, &v), &g), &b) in out.iter_mut().zip(x).zip(g).zip(b) {
        *o = (v - mu) * inv * g + b;
    }
    (mu, inv)
}
}

multiversion! {
/// RMSNorm of one row, `out = x·rstd·g` with `rstd = 1/√(mean(x²) + eps)`; returns `rstd`.
pub fn rms_norm_row(x: &[f32], g: &[f32], eps: f32, out: &mut [f32]) -> f32 {
    debug_assert!(g.len() == x.len() && out.len() == x.len());
    let inv = rstd_rms(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
        *o = v * inv * g;
    }
    inv
}
}

multiversion! {
/// [`rms_norm_row`] in place (the same numbers): `x ← x·rstd·g`; returns `rstd`.
pub fn rms_norm_in_place(x: &mut [f32], g: &[f32], eps: f32) -> f32 {
    debug_assert_eq!(g.len(), x.len());
    let inv = rstd_rms(x, eps);
    for (v, &g) in x.iter_mut().zip(g) {
        *v = *v * inv * g;
    }
    inv
}
}

/// `1/√(mean(x²) + eps)`.
#[inline(always)]
fn rstd_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (lane_sum(x, |v| v * v) / x.len() as f32 + eps).sqrt()
}

multiversion! {
/// The largest element (−∞ for an empty slice; NaNs are skipped).
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in acc.iter().chain(rest) {
        m = if x > m { x } else { m };
    }
    m
}
}

multiversion! {
/// `Σ exp(x − shift)` over `xs`.
pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
    lane_sum(xs, |x| exp(x - shift))
}
}

multiversion! {
/// Soft-capping in place: `x ← c · tanh(x / c)` (Gemma 2's attention scores and final logits), in the
/// order of operations transformers uses, through [`tanh`].
pub fn softcap_in_place(xs: &mut [f32], cap: f32) {
    for x in xs.iter_mut() {
        *x = tanh(*x / cap) * cap;
    }
}
}

multiversion! {
/// Softmax of `xs` in place (a row of attention scores). An all-(−∞) row becomes all zeros; a row
/// holding a NaN becomes all NaN (never a plausible distribution).
pub fn softmax_in_place(xs: &mut [f32]) {
    let m = max(xs);
    if xs.iter().any(|x| x.is_nan()) {
        xs.fill(f32::NAN);
        return;
    }
    if m == f32::NEG_INFINITY {
        xs.fill(0.0);
        return;
    }
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - m);
            acc[l] += c[l];
        }
    }
    let mut s = 0.0f32;
    for x in chunks.into_remainder() {
        *x = exp(*x - m);
        s += *x;
    }
    let inv = 1.0 / (acc.iter().sum::<f32>() + s);
    xs.iter_mut().for_each(|x| *x *= inv);
}
}

multiversion! {
/// GPT-2's `gelu_new` in place: `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, computed as
/// `x / (1 + e^(−2u))`.
pub fn gelu_tanh_in_place(xs: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    for x in xs {
        let v = *x;
        let u = C * (v + 0.044_715 * v * v * v);
        *x = v / (1.0 + exp(-2.0 * u));
    }
}
}

multiversion! {
/// Exact GELU in place: `½x(1 + erf(x/√2))`, with erfc from Abramowitz–Stegun 7.1.26 (absolute
/// error below 1.5e-7) taken on |x| so that negative inputs lose no digits to cancellation.
pub fn gelu_erf_in_place(xs: &mut [f32]) {
    for x in xs {
        let v = *x;
        let z = (v * std::f32::consts::FRAC_1_SQRT_2).abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_7) * t - 0.284_496_74) * t + 0.254_829_6) * t;
        let erfc = poly * exp(-z * z);
        let one_plus_erf = if v >= 0.0 { 2.0 - erfc } else { erfc };
        *x = 0.5 * v * one_plus_erf;
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Series/continued-fraction-free reference: integrate with Simpson's rule (smooth integrand).
        let n = 2000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn exp_is_within_two_ulps_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -86.9f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn softmax_and_sums_match_f64() {
        let xs: Vec<f32> = (0..37).map(|i| ((i * 7919) % 97) as f32 * 0.3 - 12.0).collect();
        let m = max(&xs);
        assert_eq!(m, xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let want: f64 = xs.iter().map(|&x| (f64::from(x) - f64::from(m)).exp()).sum();
        assert!((f64::from(sum_exp(&xs, m)) - want).abs() < 1e-6 * want);
        let mut s = xs.clone();
        softmax_in_place(&mut s);
        for (p, &x) in s.iter().zip(&xs) {
            let w = (f64::from(x) - f64::from(m)).exp() / want;
            assert!((f64::from(*p) - w).abs() < 1e-6, "{p} vs {w}");
        }
        let mut poisoned = [0.0, f32::NAN, 1.0];
        softmax_in_place(&mut poisoned);
        assert!(poisoned.iter().all(|p| p.is_nan()));
        let mut dead = [f32::NEG_INFINITY; 3];
        softmax_in_place(&mut dead);
        assert_eq!(dead, [0.0; 3]);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    /// Every version this CPU runs (AVX-512, AVX2, baseline) gives the same bits.
    #[test]
    fn every_version_gives_the_same_bits() {
        let xs: Vec<f32> = (0..1003).map(|i| ((i * 7919) % 2003) as f32 * 0.01 - 10.0).collect();
        let run = |cap: Version| {
            VERSION_CAP.with(|c| c.set(cap));
            let (mut s, mut t, mut e) = (xs.clone(), xs.clone(), xs.clone());
            softmax_in_place(&mut s);
            gelu_tanh_in_place(&mut t);
            gelu_erf_in_place(&mut e);
            let g: Vec<f32> = (0..xs.len()).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
            let (mut ln, mut rms) = (vec![0.0f32; xs.len()], vec![0.0f32; xs.len()]);
            let (mu, rstd) = layer_norm_row(&xs, &g, &xs, 1e-5, &mut ln);
            let rrstd = rms_norm_row(&xs, &g, 1e-6, &mut rms);
            let mut inplace = xs.clone();
            assert_eq!(rms_norm_in_place(&mut inplace, &g, 1e-6).to_bits(), rrstd.to_bits());
            assert_eq!(
                inplace.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                rms.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let mut capped = xs.clone();
            softcap_in_place(&mut capped, 3.0);
            let out = (max(&xs), sum_exp(&xs, 3.0), s, t, e, (mu, rstd, rrstd, ln, rms), capped);
            VERSION_CAP.with(|c| c.set(Version::Widest));
            out
        };
        let base = run(Version::Baseline);
        for wide in [run(Version::Widest), run(Version::Avx2)] {
            assert_eq!(wide.0.to_bits(), base.0.to_bits());
            assert_eq!(wide.1.to_bits(), base.1.to_bits());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (w, b) = (&wide.5, &base.5);
            assert_eq!([w.0.to_bits(), w.1.to_bits(), w.2.to_bits()], [b.0.to_bits(), b.1.to_bits(), b.2.to_bits()]);
            assert_eq!(bits(&w.3), bits(&b.3), "layer norm");
            assert_eq!(bits(&w.4), bits(&b.4), "rms norm");
            assert_eq!(bits(&wide.2), bits(&base.2), "softmax");
            assert_eq!(bits(&wide.3), bits(&base.3), "tanh gelu");
            assert_eq!(bits(&wide.4), bits(&base.4), "erf gelu");
            assert_eq!(bits(&wide.6), bits(&base.6), "soft-cap");
        }
    }

    /// `tanh` against `f64`: every 61st float from 1e-6 to 12 (both sides of the polynomial's switch,
    /// the saturated tail) and their negatives, tiny and huge values, ±0, infinities, NaN; the
    /// polynomial's coefficients against `f64`'s `tanh` below the switch; the soft-cap built on it.
    #[test]
    fn tanh_and_softcap_match_f64() {
        let (lo, hi) = (1e-6f32.to_bits(), 12.0f32.to_bits());
        let mut xs: Vec<f32> = (lo..=hi).step_by(61).map(f32::from_bits).collect();
        xs.extend([TANH_SWITCH, f32::from_bits(TANH_SWITCH.to_bits() - 1), 1e-30, 50.0, 1e30]);
        let negated: Vec<f32> = xs.iter().map(|x| -x).collect();
        xs.extend(negated);
        let mut worst = 0.0f64;
        for &x in &xs {
            let (got, want) = (f64::from(tanh(x)), f64::from(x).tanh());
            worst = worst.max((got - want).abs() / want.abs());
        }
        eprintln!("tanh: worst relative error {worst:.2e} over {} floats", xs.len());
        assert!(worst <= 2.5e-7, "tanh: worst relative error {worst:e}");
        // The coefficients themselves, in f64 so that f32 rounding cannot hide a wrong one.
        for i in 1..=550 {
            let x = f64::from(i) * 1e-3;
            let p = TANH_TAYLOR.iter().rev().fold(0.0f64, |acc, &c| acc * x * x + f64::from(c));
            let rel = (x + x * x * x * p - x.tanh()).abs() / x.tanh();
            assert!(rel <= 2e-8, "Taylor polynomial at {x}: {rel:e}");
        }
        assert_eq!(tanh(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!((tanh(f32::INFINITY), tanh(f32::NEG_INFINITY)), (1.0, -1.0));
        assert!(tanh(f32::NAN).is_nan());
        let mut capped = xs.clone();
        softcap_in_place(&mut capped, 30.0);
        for (&c, &x) in capped.iter().zip(&xs) {
            let want = 30.0 * (f64::from(x) / 30.0).tanh();
            assert!((f64::from(c) - want).abs() <= 4e-7 * want.abs() + 1e-37, "softcap({x}) = {c}, want {want}");
        }
    }

    #[test]
    fn norms_match_f64() {
        for d in [1, 15, 16, 17, 768, 1003] {
            let x: Vec<f32> = (0..d).map(|i| ((i * 7919) % 211) as f32 * 0.05 - 4.0).collect();
            let g: Vec<f32> = (0..d).map(|i| 0.5 + (i % 5) as f32 * 0.2).collect();
            let b: Vec<f32> = (0..d).map(|i| (i % 3) as f32 * 0.1 - 0.1).collect();
            let x64: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
            let mu = x64.iter().sum::<f64>() / d as f64;
            let var = x64.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / d as f64;
            let ms = x64.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let (mut ln, mut rms) = (vec![0.0f32; d], vec![0.0f32; d]);
            let (m, r) = layer_norm_row(&x, &g, &b, 1e-5, &mut ln);
            let rr = rms_norm_row(&x, &g, 1e-6, &mut rms);
            assert!((f64::from(m) - mu).abs() < 1e-5, "d={d}: mean {m} vs {mu}");
            assert!((f64::from(r) - 1.0 / (var + 1e-5).sqrt()).abs() < 1e-5 * f64::from(r), "d={d}: rstd {r}");
            assert!((f64::from(rr) - 1.0 / (ms + 1e-6).sqrt()).abs() < 1e-5 * f64::from(rr), "d={d}: rms rstd {rr}");
            for i in 0..d {
                let want = (x64[i] - mu) / (var + 1e-5).sqrt() * f64::from(g[i]) + f64::from(b[i]);
                assert!(
                    (f64::from(ln[i]) - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "d={d} i={i}: {} vs {want}",
                    ln[i]
                );
                let want = x64[i] / (ms + 1e-6).sqrt() * f64::from(g[i]);
                assert!((f64::from(rms[i]) - want).abs() < 1e-5 * (1.0 + want.abs()), "d={d} i={i}: rms {}", rms[i]);
            }
        }
    }

    #[test]
    fn gelus_match_their_f64_definitions() {
        let xs: Vec<f32> = (0..=400).map(|i| -10.0 + i as f32 * 0.05).collect();
        let mut a = xs.clone();
        gelu_tanh_in_place(&mut a);
        let mut b = xs.clone();
        gelu_erf_in_place(&mut b);
        for ((&x, &ga), &gb) in xs.iter().zip(&a).zip(&b) {
            let x64 = f64::from(x);
            let wa = 0.5 * x64 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3))).tanh());
            let wb = 0.5 * x64 * (1.0 + erf64(x64 / std::f64::consts::SQRT_2));
            assert!((f64::from(ga) - wa).abs() <= 3e-7 + 1e-6 * wa.abs(), "tanh gelu({x}) = {ga}, want {wa}");
            assert!((f64::from(gb) - wb).abs() <= 3e-7 + 1e-6 * wb.abs(), "erf gelu({x}) = {gb}, want {wb}");
        }
    }
}
