//! Small, seedable, counter-based random numbers shared by the generators and the bootstrap.
//!
//! SplitMix64 (Steele, Lea & Flood 2014) is tiny, passes BigCrush, and can jump to any position
//! (`word(key, i)`), which makes draws independent of how work is split across threads.

/// The SplitMix64 golden-ratio increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `i`-th word of the SplitMix64 stream that starts at state `key`.
#[inline]
pub fn word(key: u64, i: u64) -> u64 {
    mix64(key.wrapping_add(GAMMA.wrapping_mul(i.wrapping_add(1))))
}

/// 64-bit FNV-1a (Fowler–Noll–Vo), for fingerprints of files and tensors that must stay the same across
/// platforms and versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xCBF2_9CE4_8422_2325)
    }
}

impl Fnv1a {
    /// Feeds `bytes`.
    #[inline]
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Hashes bytes (FNV-1a, then mixed) into a stream key, e.g. an instance id with a seed.
pub fn hash_key(seed: u64, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325 ^ mix64(seed);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h ^ seed.rotate_left(17))
}

/// A sequential SplitMix64 generator with uniform and normal draws.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
    spare_normal: Option<f64>,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: mix64(seed ^ 0x6A09_E667_F3BC_C909), spare_normal: None }
    }

    /// A generator whose stream starts right after the raw SplitMix64 state `state` (no seed mixing:
    /// for streams that must reproduce a generator seeded that way).
    pub fn from_state(state: u64) -> Self {
        Self { state, spare_normal: None }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix64(self.state)
    }

    /// A uniform draw in `[0, 1)` with 53 random bits.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform integer in `0..n` (`n > 0`), by Lemire's multiply-shift (bias below 2⁻⁶⁴·n).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Shuffles `xs` in place (Fisher–Yates with [`SplitMix64::below`]): every permutation equally likely.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            xs.swap(i, j);
        }
    }

    /// A standard normal draw (Marsaglia's polar method).
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        loop {
            let u = 2.0 * self.uniform() - 1.0;
            let v = 2.0 * self.uniform() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                let f = (-2.0 * s.ln() / s).sqrt();
                self.spare_normal = Some(v * f);
                return u * f;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_unit_moments() {
        let mut rng = SplitMix64::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn word_matches_sequential_stream() {
        let key: u64 = 12345;
        let mut s = key;
        for i in 0..10 {
            s = s.wrapping_add(GAMMA);
            assert_eq!(word(key, i), mix64(s));
        }
    }

    #[test]
    fn hash_key_separates_seeds_and_ids() {
        assert_ne!(hash_key(1, b"a"), hash_key(2, b"a"));
        assert_ne!(hash_key(1, b"a"), hash_key(1, b"b"));
        assert_eq!(hash_key(1, b"a"), hash_key(1, b"a"));
    }

    /// Reference values: SplitMix64 from state 0 (Vigna's `splitmix64.c`), FNV-1a 64 of "" and "a".
    #[test]
    fn from_state_and_fnv_match_their_references() {
        let mut g = SplitMix64::from_state(0);
        assert_eq!(
            [g.next_u64(), g.next_u64(), g.next_u64()],
            [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]
        );
        assert_eq!(Fnv1a::default().finish(), 0xCBF2_9CE4_8422_2325);
        let mut h = Fnv1a::default();
        h.write(b"a");
        assert_eq!(h.finish(), 0xAF63_DC4C_8601_EC8C);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let shuffled = |seed| {
            let mut v: Vec<usize> = (0..50).collect();
            SplitMix64::new(seed).shuffle(&mut v);
            v
        };
        let mut sorted = shuffled(1);
        assert_ne!(sorted, (0..50).collect::<Vec<_>>());
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(shuffled(1), shuffled(1));
        assert_ne!(shuffled(1), shuffled(2));
    }
}
